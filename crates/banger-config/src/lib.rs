//! Where banger keeps its files and what its config file may say.
//!
//! [`Paths`] resolves the XDG locations of the spec (config, state, cache, runtime) once, so the
//! CLI and the daemon always agree on the socket and the store. [`Config`] is the parsed
//! `~/.config/banger/config.toml`: every key optional, unknown keys and bad values rejected with
//! the file, line and key named. Resolving defaults that depend on the host (vm_defaults) is left
//! to the callers that know the host; this crate only parses and validates. [`logtail`] reads
//! the end of banger's logs for failure messages, for every crate that quotes one, and
//! [`programs`] is the one `PATH` search for host programs.

use std::path::{Path, PathBuf};

use banger_net::{BridgeConfig, BridgeName, Egress, GuestLinks, HostAccess, Subnet};
use serde::{Deserialize, Deserializer};

pub mod logtail;
pub mod programs;
mod size;
pub mod sshconfig;

pub use size::ByteSize;

/// File locations, from the XDG environment variables with the spec's fallbacks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Paths {
    pub config_dir: PathBuf,
    pub state_dir: PathBuf,
    pub cache_dir: PathBuf,
    /// Directory holding the daemon socket; private to the user (0700).
    pub runtime_dir: PathBuf,
}

impl Paths {
    /// Resolves paths from the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(|k| std::env::var_os(k).filter(|v| !v.is_empty()))
    }

    /// Resolves paths from an arbitrary variable lookup (for tests).
    pub fn from_vars(
        var: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        let home = var("HOME").map(PathBuf::from).ok_or(ConfigError::NoHome)?;
        let xdg = |key: &str, fallback: &str| {
            var(key)
                .map(PathBuf::from)
                .filter(|p| p.is_absolute())
                .unwrap_or_else(|| home.join(fallback))
        };
        let state_dir = xdg("XDG_STATE_HOME", ".local/state").join("banger");
        let runtime_dir = match var("XDG_RUNTIME_DIR").map(PathBuf::from) {
            Some(dir) if dir.is_absolute() => dir.join("banger"),
            _ => state_dir.join("run"),
        };
        Ok(Self {
            config_dir: xdg("XDG_CONFIG_HOME", ".config").join("banger"),
            cache_dir: xdg("XDG_CACHE_HOME", ".cache").join("banger"),
            state_dir,
            runtime_dir,
        })
    }

    pub fn socket(&self) -> PathBuf {
        self.runtime_dir.join("bangerd.sock")
    }
    pub fn config_file(&self) -> PathBuf {
        self.config_dir.join("config.toml")
    }
    pub fn daemon_log(&self) -> PathBuf {
        self.state_dir.join("bangerd.log")
    }
    pub fn daemon_lock(&self) -> PathBuf {
        self.state_dir.join("bangerd.lock")
    }
    pub fn database(&self) -> PathBuf {
        self.state_dir.join("banger.db")
    }
    pub fn ssh_dir(&self) -> PathBuf {
        self.config_dir.join("ssh")
    }
    pub fn ssh_config(&self) -> PathBuf {
        self.config_dir.join("ssh_config")
    }
    pub fn known_hosts(&self) -> PathBuf {
        self.config_dir.join("known_hosts")
    }
}

/// Which VMM backend to use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmmChoice {
    #[default]
    Auto,
    Firecracker,
    Qemu,
}

/// `[vm_defaults]`
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmDefaults {
    #[serde(default, deserialize_with = "positive_u32")]
    pub vcpu: Option<u32>,
    #[serde(default, deserialize_with = "positive_u32")]
    pub memory_mib: Option<u32>,
    pub disk_size: Option<ByteSize>,
}

/// One `[[file_sync]]` entry, as written; validated by the consumer that knows `~`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileSync {
    pub host: String,
    pub guest: String,
    #[serde(default, deserialize_with = "octal_mode")]
    pub mode: Option<u32>,
}

/// The `[network]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkSection {
    /// Where guests may send traffic beyond the host: `"open"` (default), `"deny"`, or a list
    /// of allowed names (`"github.com"`, `"*.example.org"`).
    #[serde(default, deserialize_with = "egress")]
    pub egress: Egress,
}

/// The whole config file. Every key is optional.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub default_image_name: Option<String>,
    pub ssh_key_path: Option<PathBuf>,
    pub firecracker_bin: Option<PathBuf>,
    #[serde(default)]
    pub vmm: VmmChoice,
    /// Checked when the file is read, so a bad name is reported with its key and line.
    #[serde(default, deserialize_with = "bridge_name")]
    pub bridge_name: Option<BridgeName>,
    #[serde(default, deserialize_with = "bridge_subnet")]
    pub bridge_subnet: Option<Subnet>,
    /// Lets guests reach every service on the host, not only its `.vm` DNS server.
    #[serde(default)]
    pub host_access: bool,
    /// Keeps guests from reaching each other.
    #[serde(default)]
    pub isolate: bool,
    /// Catalog location overriding the compiled-in one (path, file://, http(s)://).
    pub catalog_url: Option<String>,
    /// Debian mirror for local image builds, overriding the host's apt sources.
    pub debian_mirror: Option<String>,
    /// OCI registries that may be reached over plain HTTP (`host` or `host:port`). Loopback
    /// registries always may, as with Docker; every other registry needs HTTPS.
    #[serde(default, deserialize_with = "registry_hosts")]
    pub insecure_registries: Vec<String>,
    #[serde(default)]
    pub vm_defaults: VmDefaults,
    #[serde(default)]
    pub file_sync: Vec<FileSync>,
    #[serde(default)]
    pub network: NetworkSection,
    /// Keep a warm snapshot of the first VM of each image and shape and start later ones from
    /// it (the default); `false` boots every VM.
    pub warm_starts: Option<bool>,
}

pub const DEFAULT_IMAGE: &str = "debian-bookworm";

impl Config {
    /// Whether VMs start from warm snapshots (`warm_starts`, on unless set to false).
    pub fn warm_starts(&self) -> bool {
        self.warm_starts.unwrap_or(true)
    }

    /// Reads the config file; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(&text, path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_owned(),
                source,
            }),
        }
    }

    /// Parses config text; errors carry the file, line and key.
    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| located_error(text, path, &e))
    }

    pub fn default_image(&self) -> &str {
        self.default_image_name.as_deref().unwrap_or(DEFAULT_IMAGE)
    }
    /// The bridge and subnet guests use, defaults filled in (`banger0`, `172.16.0.1/24`).
    pub fn bridge(&self) -> BridgeConfig {
        BridgeConfig {
            bridge: self.bridge_name.clone().unwrap_or_default(),
            subnet: self.bridge_subnet.unwrap_or_default(),
            host_access: if self.host_access {
                HostAccess::Open
            } else {
                HostAccess::DnsOnly
            },
            guest_links: if self.isolate {
                GuestLinks::Isolated
            } else {
                GuestLinks::Open
            },
            // Not a config key: the daemon names itself.
            owner: banger_net::BridgeOwner::default(),
        }
    }
}

fn located_error(text: &str, path: &Path, e: &toml::de::Error) -> ConfigError {
    let (line, key) = match e.span() {
        Some(span) => {
            let line_no = text[..span.start.min(text.len())].matches('\n').count() + 1;
            let line_text = text.lines().nth(line_no - 1).unwrap_or("");
            let key = line_text
                .split_once('=')
                .map(|(k, _)| k.trim().trim_matches('"').to_owned())
                .filter(|k| !k.is_empty() && !k.starts_with('['));
            (Some(line_no), key)
        }
        None => (None, None),
    };
    ConfigError::Invalid {
        path: path.to_owned(),
        line,
        key,
        message: e.message().trim().to_owned(),
    }
}

fn bridge_name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<BridgeName>, D::Error> {
    let name = String::deserialize(d)?;
    BridgeName::parse(&name).map(Some).map_err(with_hint)
}

fn bridge_subnet<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Subnet>, D::Error> {
    let subnet = String::deserialize(d)?;
    subnet.parse().map(Some).map_err(with_hint)
}

/// A value error for serde, its hint kept: a config error is one line of text.
fn with_hint<E: banger_hint::Hint, D: serde::de::Error>(e: E) -> D {
    match e.hint() {
        Some(h) => D::custom(format!("{e} ({h})")),
        None => D::custom(e),
    }
}

fn egress<'de, D: Deserializer<'de>>(d: D) -> Result<Egress, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Word(String),
        List(Vec<String>),
    }
    match Raw::deserialize(d).map_err(|_| {
        serde::de::Error::custom(
            "must be \"open\", \"deny\" or a list of allowed names like [\"github.com\", \"*.example.org\"]",
        )
    })? {
        Raw::Word(w) if w == "open" => Ok(Egress::Open),
        Raw::Word(w) if w == "deny" => Ok(Egress::Deny),
        Raw::Word(w) => Err(serde::de::Error::custom(format!(
            "must be \"open\", \"deny\" or a list of names, not {w:?} (for one name write [{w:?}])"
        ))),
        // An empty list allows nothing: the same as "deny", said plainly.
        Raw::List(names) => banger_net::egress::parse_hosts(&names)
            .map(|list| if list.is_empty() { Egress::Deny } else { Egress::Allow(list) })
            .map_err(with_hint),
    }
}

fn positive_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    let v = i64::deserialize(d)?;
    if v < 1 || v > i64::from(u32::MAX) {
        return Err(serde::de::Error::custom(format!(
            "must be a positive whole number, got {v}"
        )));
    }
    Ok(u32::try_from(v).ok())
}

/// `insecure_registries` entries: a registry host as it appears in image references, with an
/// optional port, and nothing else (no scheme, path or credentials), so an entry can never widen
/// to more than the one registry it names.
fn registry_hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    let hosts = Vec::<String>::deserialize(d)?;
    for h in &hosts {
        valid_registry_host(h).map_err(serde::de::Error::custom)?;
    }
    Ok(hosts.into_iter().map(|h| h.to_ascii_lowercase()).collect())
}

fn valid_registry_host(entry: &str) -> Result<(), String> {
    let bad = |why: &str| {
        format!("{entry:?} is not a registry host ({why}); write it as `host` or `host:port`")
    };
    if entry.contains("://") || entry.contains('/') || entry.contains('@') {
        return Err(bad("no scheme, path or user"));
    }
    let (host, port) = match entry.rsplit_once(':') {
        // A bracketed IPv6 literal keeps its colons inside the brackets.
        Some((h, p)) if !p.contains(']') => (h, Some(p)),
        _ => (entry, None),
    };
    if let Some(p) = port {
        if p.parse::<u16>().map_or(true, |n| n == 0) {
            return Err(bad("the port must be a number from 1 to 65535"));
        }
    }
    let ok_host = if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        inner.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-')
            })
    };
    if !ok_host {
        return Err(bad(
            "the host must be a DNS name, an IPv4 address or a bracketed IPv6 address",
        ));
    }
    Ok(())
}

fn octal_mode<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Text(String),
        Number(i64),
    }
    let bad = |what: &str| {
        serde::de::Error::custom(format!(
            "mode must be an octal permission like \"0644\", got {what}"
        ))
    };
    let mode = match Raw::deserialize(d)? {
        Raw::Text(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8).map_err(|_| bad(&s))?,
        // A bare number is read as the digits the user wrote (644 means 0644).
        Raw::Number(n) => {
            u32::from_str_radix(&n.to_string(), 8).map_err(|_| bad(&n.to_string()))?
        }
    };
    if mode > 0o7777 {
        return Err(bad(&format!("{mode:o}")));
    }
    Ok(Some(mode))
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("HOME is not set; banger needs it to find its config and state")]
    NoHome,
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}", describe_invalid(path, *line, key.as_deref(), message))]
    Invalid {
        path: PathBuf,
        line: Option<usize>,
        key: Option<String>,
        message: String,
    },
}

fn describe_invalid(path: &Path, line: Option<usize>, key: Option<&str>, message: &str) -> String {
    let place = match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    };
    match key {
        Some(k) => format!("invalid config at {place}: key `{k}`: {message}"),
        None => format!("invalid config at {place}: {message}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(text, Path::new("/home/u/.config/banger/config.toml"))
    }

    #[test]
    fn empty_config_is_all_defaults() {
        let c = parse("").unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.default_image(), "debian-bookworm");
        assert_eq!(c.bridge().bridge.as_str(), "banger0");
        assert_eq!(c.bridge().subnet.to_string(), "172.16.0.1/24");
    }

    #[test]
    fn every_key_parses() {
        let c = parse(
            r#"
default_image_name = "mine"
ssh_key_path = "/k"
firecracker_bin = "/fc"
vmm = "qemu"
bridge_name = "br9"
bridge_subnet = "10.9.0.1/24"
host_access = true
isolate = true
catalog_url = "file:///c.toml"
debian_mirror = "http://mirror.invalid/debian"
insecure_registries = ["registry.lan:5000", "10.0.0.7", "[fd00::1]:5000"]

[network]
egress = ["github.com", "*.Example.org"]

[vm_defaults]
vcpu = 2
memory_mib = 2048
disk_size = "16G"

[[file_sync]]
host = "~/.gitconfig"
guest = "~/.gitconfig"
mode = "0644"

[[file_sync]]
host = "~/.aws"
guest = "/root/.aws"
"#,
        )
        .unwrap();
        assert_eq!(c.vmm, VmmChoice::Qemu);
        assert_eq!(
            c.network.egress.to_string(),
            "only *.example.org, github.com"
        );
        assert_eq!(Config::default().network.egress, Egress::Open);
        assert_eq!(c.bridge().host_access, HostAccess::Open);
        assert_eq!(c.bridge().guest_links, GuestLinks::Isolated);
        assert_eq!(Config::default().bridge().guest_links, GuestLinks::Open);
        assert_eq!(Config::default().bridge().host_access, HostAccess::DnsOnly);
        assert_eq!(c.vm_defaults.vcpu, Some(2));
        assert_eq!(c.vm_defaults.disk_size, Some(ByteSize(16 << 30)));
        assert_eq!(c.file_sync[0].mode, Some(0o644));
        assert_eq!(c.file_sync[1].mode, None);
        assert_eq!(
            c.insecure_registries,
            ["registry.lan:5000", "10.0.0.7", "[fd00::1]:5000"]
        );
    }

    #[test]
    fn egress_is_open_deny_or_a_list_of_names() {
        let egress =
            |v: &str| parse(&format!("[network]\negress = {v}\n")).map(|c| c.network.egress);
        assert_eq!(egress("\"open\"").unwrap(), Egress::Open);
        assert_eq!(egress("\"deny\"").unwrap(), Egress::Deny);
        assert_eq!(egress("[]").unwrap(), Egress::Deny);
        for (bad, says) in [
            ("\"github.com\"", "for one name write [\"github.com\"]"),
            ("\"allow\"", "must be \"open\""),
            ("3", "must be \"open\""),
            ("[\"a b\"]", "`a b` is not a host name"),
            ("[\"*.org\"]", "wildcard"),
        ] {
            let err = egress(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
            assert!(err.contains(":2"), "the line is named: {err}");
        }
        let err = parse("[network]\negres = \"deny\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("egres"), "{err}");
    }

    #[test]
    fn insecure_registries_take_hosts_only() {
        for bad in [
            "http://registry.lan",
            "registry.lan/path",
            "user@registry.lan",
            "registry.lan:0",
            "registry.lan:99999",
            "-bad.lan",
            "",
            "[not-ipv6]:5000",
        ] {
            let err = parse(&format!("insecure_registries = [{bad:?}]\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("`insecure_registries`"), "{bad}: {err}");
            assert!(err.contains("host:port"), "{bad}: {err}");
        }
        let c = parse("insecure_registries = [\"Registry.LAN:5000\"]\n").unwrap();
        assert_eq!(c.insecure_registries, ["registry.lan:5000"]);
    }

    #[test]
    fn bridge_keys_are_checked_when_read() {
        let c = parse("bridge_name = \"br9\"\nbridge_subnet = \"10.9.0.1/24\"\n").unwrap();
        assert_eq!(c.bridge().bridge.as_str(), "br9");
        assert_eq!(c.bridge().subnet.to_string(), "10.9.0.1/24");
        for (text, line, key) in [
            (
                "vmm = \"qemu\"\nbridge_subnet = \"10.9.0.0/24\"\n",
                2,
                "bridge_subnet",
            ),
            ("\n\nbridge_subnet = \"10.9.0.1/31\"\n", 3, "bridge_subnet"),
            ("bridge_subnet = \"ten\"\n", 1, "bridge_subnet"),
            ("bridge_name = \"-rf\"\n", 1, "bridge_name"),
            (
                "bridge_name = \"a-name-too-long-for-linux\"\n",
                1,
                "bridge_name",
            ),
            ("vmm = \"qemu\"\nwarm_starts = \"yes\"\n", 2, "warm_starts"),
        ] {
            let err = parse(text).unwrap_err().to_string();
            assert!(
                err.contains(&format!("config.toml:{line}")),
                "{text}: {err}"
            );
            assert!(err.contains(&format!("key `{key}`")), "{text}: {err}");
        }
    }

    #[test]
    fn warm_starts_are_on_unless_turned_off() {
        assert!(parse("").unwrap().warm_starts());
        assert!(parse("warm_starts = true\n").unwrap().warm_starts());
        assert!(!parse("warm_starts = false\n").unwrap().warm_starts());
    }

    #[test]
    fn typo_key_names_key_and_line() {
        let err = parse("vmm = \"qemu\"\n[vm_defaults]\nvcpus = 2\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.toml:3"), "{err}");
        assert!(err.contains("`vcpus`"), "{err}");
        assert!(err.contains("unknown field"), "{err}");
    }

    #[test]
    fn bad_size_names_key_and_line() {
        let err = parse("[vm_defaults]\n\ndisk_size = \"16Q\"\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("config.toml:3"), "{err}");
        assert!(err.contains("`disk_size`"), "{err}");
    }

    #[test]
    fn negative_vcpu_names_key_and_line() {
        let err = parse("[vm_defaults]\nvcpu = -1\n").unwrap_err().to_string();
        assert!(err.contains("config.toml:2"), "{err}");
        assert!(err.contains("`vcpu`"), "{err}");
        assert!(err.contains("positive"), "{err}");
    }

    #[test]
    fn bad_vmm_value_is_refused() {
        let err = parse("vmm = \"kvmtool\"\n").unwrap_err().to_string();
        assert!(err.contains("`vmm`"), "{err}");
    }

    #[test]
    fn xdg_paths_and_fallbacks() {
        let p = Paths::from_vars(|k| match k {
            "HOME" => Some("/h".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(p.config_dir, PathBuf::from("/h/.config/banger"));
        assert_eq!(p.state_dir, PathBuf::from("/h/.local/state/banger"));
        assert_eq!(p.cache_dir, PathBuf::from("/h/.cache/banger"));
        assert_eq!(
            p.socket(),
            PathBuf::from("/h/.local/state/banger/run/bangerd.sock")
        );

        let p = Paths::from_vars(|k| match k {
            "HOME" => Some("/h".into()),
            "XDG_RUNTIME_DIR" => Some("/run/user/7".into()),
            "XDG_STATE_HOME" => Some("/s".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(p.socket(), PathBuf::from("/run/user/7/banger/bangerd.sock"));
        assert_eq!(p.database(), PathBuf::from("/s/banger/banger.db"));
    }
}
