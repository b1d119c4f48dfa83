//! `banger doctor`: the host checks, each judged pass/warn/fail with a fix hint, plus their text
//! and JSON rendering and the resulting exit status.
//!
//! Every fact about the host comes through the [`Probe`] trait so the rules are tested with a
//! fake; [`HostProbe`] reads the real machine. The KVM and VMM checks do not judge for
//! themselves: they ask banger-vmm's own rules (`kvm_mode_of`, each backend's availability and
//! `select` with the config's `vmm` setting), over the facts the probe reports, so `doctor` says
//! what the daemon will do. Effective `vm_defaults` come from the config crate and are printed
//! by the command, not here.

use std::borrow::Cow;
use std::ffi::CStr;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use banger_config::programs;
use banger_hint::Hint;
use banger_vmm::{Availability, BackendKind, Choice, HostFacts, KvmMode, Support, VmmError};
use serde::Serialize;

const GIB: u64 = 1024 * 1024 * 1024;
/// Below this, a single image build plus a VM work disk may not fit.
const DISK_WARN_BYTES: u64 = 10 * GIB;
/// Below this, even one small image cannot be unpacked.
const DISK_FAIL_BYTES: u64 = 2 * GIB;

/// Outcome of one check. Only `Fail` makes `doctor` exit non-zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Pass,
    Warn,
    Fail,
}

/// One line of the `doctor` report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Check {
    /// Short stable identifier, e.g. `kvm-mode`; scripts match on it in `--json` output.
    pub name: &'static str,
    pub level: Level,
    /// What was found, in words a user can act on.
    pub detail: String,
    /// What to do about it; present whenever `level` is not `Pass`.
    pub fix: Option<String>,
}

impl Check {
    fn pass(name: &'static str, detail: impl Into<String>) -> Self {
        Check {
            name,
            level: Level::Pass,
            detail: detail.into(),
            fix: None,
        }
    }

    fn warn(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            level: Level::Warn,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }

    fn fail(name: &'static str, detail: impl Into<String>, fix: impl Into<String>) -> Self {
        Check {
            name,
            level: Level::Fail,
            detail: detail.into(),
            fix: Some(fix.into()),
        }
    }
}

/// Whether the current user can open a device node read-write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Ok,
    Missing,
    /// Exists but cannot be opened; carries the OS error text.
    Denied(String),
}

/// What a finished command printed and whether it exited 0.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct CommandOutput {
    pub success: bool,
    pub stdout: String,
    pub stderr: String,
}

/// The facts `doctor` needs about the host. Kept to primitives so a fake is a few maps.
pub trait Probe {
    /// Machine hardware name as `uname -m` prints it.
    fn arch(&self) -> String;
    fn device_access(&self, path: &Path) -> Access;
    /// The facts banger-vmm judges KVM and the VMM backends by (`/dev/kvm`, modules, CPU flags,
    /// programs on PATH).
    fn vmm_host(&self) -> &dyn HostFacts;
    fn path_exists(&self, path: &Path) -> bool;
    /// Where `program` would be run from, or None if it is not installed.
    fn find_program(&self, program: &str) -> Option<PathBuf>;
    /// Runs `program` with `args` (stdin closed) and collects its output; Err if it could not start.
    fn run(&self, program: &Path, args: &[&str]) -> Result<CommandOutput, String>;
    fn is_root(&self) -> bool;
    fn read_to_string(&self, path: &Path) -> Option<String>;
    /// banger's state directory (images, VM disks); it may not exist yet.
    fn state_dir(&self) -> PathBuf;
    /// Bytes available to unprivileged users on the filesystem holding `path`.
    fn free_bytes(&self, path: &Path) -> Result<u64, String>;
    /// The bridge address from the config: where banger's DNS server listens.
    fn bridge_address(&self) -> Ipv4Addr;
}

/// Runs every check, in report order. `vmm` is the config's say in the choice of backend.
pub fn run_checks(probe: &dyn Probe, vmm: &banger_vmm::VmmSettings) -> Vec<Check> {
    let host = probe.vmm_host();
    let mut checks = vec![
        check_arch(probe),
        check_kvm_device(probe),
        check_kvm_mode(&banger_vmm::kvm_mode_of(host)),
    ];
    let choice = banger_vmm::select(host, vmm);
    for kind in BackendKind::ALL {
        let seen = Backend {
            availability: kind.availability(host, vmm),
            choice: &choice,
            named: vmm.preference != banger_config::VmmChoice::Auto,
        };
        checks.push(check_backend(probe, &seen));
    }
    checks.push(check_tun(probe));
    checks.push(check_vhost_vsock(probe));
    checks.push(check_ip_forward(probe));
    checks.push(check_nft(probe));
    checks.push(check_e2fsprogs(probe));
    checks.push(check_ssh(probe));
    checks.push(check_sudo(probe));
    checks.push(check_debootstrap(probe));
    checks.push(check_disk(probe));
    checks.push(check_resolved(probe));
    checks
}

/// Human report: one aligned `[pass]`/`[warn]`/`[FAIL]` line per check, the fix indented below,
/// and a one-line summary.
pub fn render_text(checks: &[Check]) -> String {
    let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
    let mut out = String::new();
    for check in checks {
        let tag = match check.level {
            Level::Pass => "[pass]",
            Level::Warn => "[warn]",
            Level::Fail => "[FAIL]",
        };
        out.push_str(&format!("{tag} {:<width$}  {}\n", check.name, check.detail));
        if let Some(fix) = &check.fix {
            out.push_str(&format!("       {:<width$}  fix: {fix}\n", ""));
        }
    }
    let count = |level| checks.iter().filter(|c| c.level == level).count();
    let (warns, fails) = (count(Level::Warn), count(Level::Fail));
    out.push_str(&format!(
        "\n{} checks: {} passed, {warns} {}, {fails} failed\n",
        checks.len(),
        count(Level::Pass),
        if warns == 1 { "warning" } else { "warnings" },
    ));
    out
}

/// Process exit status for `doctor`: 1 if any check failed, else 0.
pub fn exit_code(checks: &[Check]) -> i32 {
    if checks.iter().any(|c| c.level == Level::Fail) {
        1
    } else {
        0
    }
}

fn check_arch(probe: &dyn Probe) -> Check {
    let arch = probe.arch();
    if arch == "x86_64" {
        Check::pass("arch", arch)
    } else {
        Check::fail(
            "arch",
            format!("{arch}: banger supports x86_64 hosts only"),
            "run banger on an x86_64 Linux host",
        )
    }
}

fn check_kvm_device(probe: &dyn Probe) -> Check {
    const NAME: &str = "kvm-device";
    match probe.device_access(Path::new("/dev/kvm")) {
        Access::Ok => Check::pass(NAME, "/dev/kvm is readable and writable"),
        Access::Missing => Check::warn(
            NAME,
            "/dev/kvm does not exist: VMs run under QEMU (TCG) software emulation, which is slow",
            "enable virtualization (VT-x/AMD-V) in firmware and load kvm_intel or kvm_amd; \
             on a cloud VM pick an instance type with nested virtualization",
        ),
        Access::Denied(err) => Check::warn(
            NAME,
            format!("/dev/kvm exists but cannot be opened ({err}): VMs fall back to QEMU (TCG)"),
            "add yourself to the kvm group (`sudo usermod -aG kvm $USER`) and log in again",
        ),
    }
}

/// The host's KVM as banger-vmm judges it (the daemon's own verdict).
fn check_kvm_mode(kvm: &KvmMode) -> Check {
    const NAME: &str = "kvm-mode";
    const MODPROBE: &str = "`sudo modprobe kvm_intel` (or kvm_amd); if that fails, enable \
                            virtualization in firmware or use a host with nested virtualization";
    match kvm {
        KvmMode::HardwareIntel | KvmMode::HardwareAmd => {
            Check::pass(NAME, format!("hardware virtualization: {}", kvm.describe()))
        }
        KvmMode::NestedSoftware => Check::warn(
            NAME,
            "kvm_pvm: KVM runs in nested software mode and cannot boot ordinary guest kernels; \
             banger uses the QEMU (TCG) fallback, which works but is several times slower",
            "for fast VMs use a host with hardware KVM (kvm_intel or kvm_amd); \
             nothing to do to keep using QEMU (TCG)",
        ),
        KvmMode::Absent => Check::warn(
            NAME,
            format!("{}: banger uses the QEMU (TCG) fallback", kvm.describe()),
            MODPROBE,
        ),
        KvmMode::Unusable(reason) => Check::warn(
            NAME,
            format!("{reason}: banger uses the QEMU (TCG) fallback"),
            format!("see the kvm-device check; for hardware KVM, {MODPROBE}"),
        ),
    }
}

/// First non-empty line a `--version` run printed, from stdout or (ssh, mke2fs) stderr.
fn version_line(output: &CommandOutput) -> Option<String> {
    output
        .stdout
        .lines()
        .chain(output.stderr.lines())
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// Runs `<program> <args>` to learn its version; Err names what went wrong.
fn program_version(probe: &dyn Probe, path: &Path, args: &[&str]) -> Result<String, String> {
    let shown = format!("`{} {}`", path.display(), args.join(" "));
    match probe.run(path, args) {
        Ok(out) if out.success => {
            version_line(&out).ok_or_else(|| format!("{shown} printed nothing"))
        }
        Ok(out) => Err(format!(
            "{shown} failed: {}",
            version_line(&CommandOutput {
                stdout: String::new(),
                ..out
            })
            .unwrap_or_else(|| "no output".to_owned())
        )),
        Err(err) => Err(format!("{shown} could not run: {err}")),
    }
}

/// One backend as `doctor` sees it: what the host offers it, and what banger chose.
struct Backend<'a> {
    availability: Availability,
    choice: &'a Result<Choice, VmmError>,
    /// The config names a backend (`vmm` is not `auto`).
    named: bool,
}

impl Backend<'_> {
    fn kind(&self) -> BackendKind {
        self.availability.kind
    }

    fn is_chosen(&self) -> bool {
        self.choice.as_ref().is_ok_and(|c| c.kind == self.kind())
    }

    /// The backend new VMs run on, if it is not this one.
    fn other_chosen(&self) -> Option<BackendKind> {
        self.choice
            .as_ref()
            .ok()
            .map(|c| c.kind)
            .filter(|k| *k != self.kind())
    }

    /// No backend can run VMs, and this one is why (the one the config names, or auto's last
    /// resort).
    fn blocks_everything(&self) -> Option<&VmmError> {
        let error = self.choice.as_ref().err()?;
        let ours = match error {
            VmmError::BinaryNotFound { backend, .. } => *backend == self.kind(),
            VmmError::KvmUnusable { .. } => self.kind() == BackendKind::Firecracker,
            _ => false,
        };
        ours.then_some(error)
    }

    /// Why the host cannot run this backend fully, in a few words.
    fn limit(&self) -> Option<&str> {
        match &self.availability.support {
            Support::Full => None,
            Support::Limited { why, .. } | Support::Unusable { why, .. } => Some(why),
        }
    }
}

/// A VMM backend: installed or not, working or not, and whether banger uses it, all from
/// banger-vmm's own judgement of this host.
fn check_backend(probe: &dyn Probe, b: &Backend<'_>) -> Check {
    let name = b.kind().as_str();
    let install = b.kind().install_hint();
    if let Some(error) = b.blocks_everything() {
        return Check::fail(
            name,
            format!("{error}: no VMM can start VMs"),
            error
                .hint()
                .map_or_else(|| install.to_owned(), Cow::into_owned),
        );
    }
    let chosen = b.other_chosen();
    let Ok(path) = &b.availability.binary else {
        return check_missing_backend(b, chosen);
    };
    let version = match program_version(probe, path, &["--version"]) {
        Ok(version) => version,
        Err(err) if b.is_chosen() => {
            return Check::fail(name, format!("{err}; banger runs new VMs on it"), install)
        }
        Err(err) => return Check::warn(name, err, install),
    };
    let found = format!("{version} at {}", path.display());
    if let Some(c) = b.choice.as_ref().ok().filter(|_| b.is_chosen()) {
        return Check::pass(name, format!("{found}; new VMs run on it: {}", c.reason));
    }
    let instead = chosen.map_or_else(String::new, |other| format!("; {other} is used instead"));
    match (b.limit(), chosen) {
        (Some(limit), _) => Check::warn(
            name,
            format!("{found} is installed but cannot boot ordinary guests here ({limit}){instead}"),
            "use a host with hardware KVM (kvm_intel or kvm_amd) and access to /dev/kvm",
        ),
        (None, Some(other)) if !b.named => {
            Check::pass(name, format!("{found} (fallback; {other} is preferred)"))
        }
        (None, _) => Check::pass(
            name,
            format!("{found} (not used: the config names another VMM)"),
        ),
    }
}

/// A backend whose program is not installed: worth a warning only where banger would use it.
fn check_missing_backend(b: &Backend<'_>, chosen: Option<BackendKind>) -> Check {
    let name = b.kind().as_str();
    let Some(other) = chosen else {
        return Check::pass(
            name,
            match b.limit() {
                Some(limit) => format!("not installed (not usable here: {limit})"),
                None => "not installed".to_owned(),
            },
        );
    };
    if let Some(limit) = b.limit() {
        return Check::pass(
            name,
            format!("not installed (not usable here: {limit}; {other} is used)"),
        );
    }
    if b.named {
        return Check::pass(
            name,
            format!("not installed (not needed: the config names {other})"),
        );
    }
    // `auto` takes backends in BackendKind::ALL's order.
    let rank = |k: BackendKind| BackendKind::ALL.iter().position(|x| *x == k);
    let install = b.kind().install_hint();
    if rank(b.kind()) < rank(other) {
        Check::warn(
            name,
            format!("not found: VMs run under {other} instead of {name}"),
            install,
        )
    } else {
        Check::warn(
            name,
            format!("not found; {other} is used, {name} is only the fallback"),
            install,
        )
    }
}

fn check_tun(probe: &dyn Probe) -> Check {
    const NAME: &str = "tun";
    match probe.device_access(Path::new("/dev/net/tun")) {
        Access::Ok => Check::pass(NAME, "/dev/net/tun is usable"),
        Access::Missing => Check::fail(
            NAME,
            "/dev/net/tun does not exist: VMs cannot get network interfaces",
            "sudo modprobe tun",
        ),
        Access::Denied(err) => Check::warn(
            NAME,
            format!("/dev/net/tun cannot be opened ({err}); the VMM needs it to attach taps"),
            "sudo chmod 0666 /dev/net/tun (the usual mode), or run banger as root",
        ),
    }
}

fn check_vhost_vsock(probe: &dyn Probe) -> Check {
    const NAME: &str = "vhost-vsock";
    match probe.device_access(Path::new("/dev/vhost-vsock")) {
        Access::Ok => Check::pass(NAME, "/dev/vhost-vsock is usable"),
        Access::Missing => Check::warn(
            NAME,
            "/dev/vhost-vsock does not exist: under QEMU the guest agent falls back to \
             virtio-serial (Firecracker does not need it)",
            "sudo modprobe vhost_vsock (optional; the virtio-serial fallback works)",
        ),
        Access::Denied(err) => Check::warn(
            NAME,
            format!(
                "/dev/vhost-vsock cannot be opened ({err}): the guest agent falls back to \
                 virtio-serial under QEMU"
            ),
            "give your user read-write access to /dev/vhost-vsock (optional)",
        ),
    }
}

fn check_ip_forward(probe: &dyn Probe) -> Check {
    const NAME: &str = "ip-forward";
    const PATH: &str = "/proc/sys/net/ipv4/ip_forward";
    match probe
        .read_to_string(Path::new(PATH))
        .as_deref()
        .map(str::trim)
    {
        Some("1") => Check::pass(NAME, "IPv4 forwarding is on"),
        Some("0") => Check::pass(
            NAME,
            "IPv4 forwarding is off; banger turns it on when a VM starts",
        ),
        other => Check::warn(
            NAME,
            format!(
                "cannot read {PATH} ({}); guests may have no internet access",
                other.map_or("unreadable".to_owned(), |v| format!("value {v:?}"))
            ),
            "check that /proc is mounted and IPv4 is enabled in the kernel",
        ),
    }
}

fn check_nft(probe: &dyn Probe) -> Check {
    const NAME: &str = "nft";
    const INSTALL: &str = "sudo apt-get install nftables";
    let Some(path) = probe.find_program("nft") else {
        return Check::fail(
            NAME,
            "nft not found: banger needs it for guest NAT",
            INSTALL,
        );
    };
    match program_version(probe, &path, &["--version"]) {
        Ok(version) => Check::pass(NAME, format!("{version} at {}", path.display())),
        Err(err) => Check::fail(NAME, err, INSTALL),
    }
}

/// A package of tools that must all be present; the first one reports the version.
struct ToolSet {
    name: &'static str,
    install: &'static str,
    tools: &'static [&'static str],
    version_args: &'static [&'static str],
    needed_for: &'static str,
    found: &'static str,
}

fn check_tool_set(probe: &dyn Probe, set: &ToolSet) -> Check {
    let missing: Vec<&str> = set
        .tools
        .iter()
        .copied()
        .filter(|t| probe.find_program(t).is_none())
        .collect();
    if !missing.is_empty() {
        return Check::fail(
            set.name,
            format!("{} not found: {}", missing.join(", "), set.needed_for),
            set.install,
        );
    }
    let Some(first) = probe.find_program(set.tools[0]) else {
        return Check::fail(set.name, format!("{} not found", set.tools[0]), set.install);
    };
    match program_version(probe, &first, set.version_args) {
        Ok(version) => Check::pass(set.name, format!("{version}; {}", set.found)),
        Err(err) => Check::fail(set.name, err, set.install),
    }
}

fn check_e2fsprogs(probe: &dyn Probe) -> Check {
    // `mkfs.ext4 -V` prints its version on stderr and exits 0.
    check_tool_set(
        probe,
        &ToolSet {
            name: "e2fsprogs",
            install: "sudo apt-get install e2fsprogs",
            tools: &["mkfs.ext4", "debugfs", "e2fsck"],
            version_args: &["-V"],
            needed_for: "banger needs them to build VM disks",
            found: "mkfs.ext4, debugfs, e2fsck found",
        },
    )
}

fn check_ssh(probe: &dyn Probe) -> Check {
    check_tool_set(
        probe,
        &ToolSet {
            name: "ssh",
            install: "sudo apt-get install openssh-client",
            tools: &["ssh", "ssh-keygen"],
            version_args: &["-V"],
            needed_for: "needed for `vm ssh` and VM keys",
            found: "ssh-keygen found",
        },
    )
}

fn check_sudo(probe: &dyn Probe) -> Check {
    const NAME: &str = "sudo";
    if probe.is_root() {
        return Check::pass(NAME, "running as root; privileged steps run directly");
    }
    const RULE: &str = "allow passwordless sudo for your user (a rule in /etc/sudoers.d/), \
                        or run banger as root";
    let Some(sudo) = probe.find_program("sudo") else {
        return Check::fail(
            NAME,
            "not root and sudo not found: banger cannot create the bridge, taps and NAT rules",
            format!("sudo apt-get install sudo (as root), then {RULE}"),
        );
    };
    match probe.run(&sudo, &["-n", "true"]) {
        Ok(out) if out.success => Check::pass(NAME, "passwordless sudo works"),
        Ok(_) => Check::fail(
            NAME,
            "`sudo -n true` failed: sudo wants a password, which the daemon cannot type",
            RULE,
        ),
        Err(err) => Check::fail(NAME, format!("`sudo -n true` could not run: {err}"), RULE),
    }
}

fn check_debootstrap(probe: &dyn Probe) -> Check {
    const NAME: &str = "debootstrap";
    const INSTALL: &str = "sudo apt-get install debootstrap (only needed for `image build`)";
    let Some(path) = probe.find_program("debootstrap") else {
        return Check::warn(
            NAME,
            "not found: local image builds will fail (pulled images still work)",
            INSTALL,
        );
    };
    match program_version(probe, &path, &["--version"]) {
        Ok(version) => Check::pass(NAME, format!("{version} at {}", path.display())),
        Err(err) => Check::warn(NAME, err, INSTALL),
    }
}

/// The state dir may not exist before the first VM; measure the filesystem it will live on.
fn nearest_existing(probe: &dyn Probe, dir: &Path) -> PathBuf {
    dir.ancestors()
        .find(|p| !p.as_os_str().is_empty() && probe.path_exists(p))
        .map_or_else(|| PathBuf::from("/"), Path::to_path_buf)
}

fn check_disk(probe: &dyn Probe) -> Check {
    const NAME: &str = "disk";
    let state = probe.state_dir();
    let measured = nearest_existing(probe, &state);
    const FIX: &str = "free space there, or point XDG_STATE_HOME at a larger disk";
    let free = match probe.free_bytes(&measured) {
        Ok(free) => free,
        Err(err) => {
            return Check::warn(
                NAME,
                format!("cannot measure free space at {}: {err}", measured.display()),
                FIX,
            )
        }
    };
    let detail = format!(
        "{:.1} GiB free for {}",
        free as f64 / GIB as f64,
        state.display()
    );
    if free < DISK_FAIL_BYTES {
        Check::fail(NAME, format!("{detail}: too little for one image"), FIX)
    } else if free < DISK_WARN_BYTES {
        Check::warn(
            NAME,
            format!("{detail}: under 10 GiB, images and VM disks may not fit"),
            FIX,
        )
    } else {
        Check::pass(NAME, detail)
    }
}

/// Files the recipes in docs/dns-routing.md tell users to create; their presence (with a
/// `server=/vm/` line) means `.vm` is routed by hand.
const DNSMASQ_ROUTES: [&str; 2] = [
    "/etc/dnsmasq.d/banger.conf",
    "/etc/NetworkManager/dnsmasq.d/banger.conf",
];

/// Which way the host's `.vm` lookups reach banger's DNS server, if any, and which recipe of
/// docs/dns-routing.md applies when none does.
fn check_resolved(probe: &dyn Probe) -> Check {
    const NAME: &str = "dns";
    // In the source tree, and under PREFIX/share/doc/banger after `make install`.
    const DOC: &str = "docs/dns-routing.md";
    let gw = probe.bridge_address();
    let resolved = [
        "/run/systemd/resolve/io.systemd.Resolve",
        "/run/systemd/resolve/stub-resolv.conf",
    ]
    .iter()
    .any(|p| probe.path_exists(Path::new(p)));
    if resolved {
        return Check::pass(
            NAME,
            format!(
                "systemd-resolved runs: while a VM runs, banger routes `.vm` to its DNS server \
                 on {gw} (`resolvectl status` shows it on the bridge)"
            ),
        );
    }
    for file in DNSMASQ_ROUTES {
        if let Some(text) = probe.read_to_string(Path::new(file)) {
            if text.contains(&format!("server=/vm/{gw}")) {
                return Check::pass(NAME, format!("`.vm` is routed to {gw} by dnsmasq ({file})"));
            }
        }
    }
    let resolv = probe
        .read_to_string(Path::new("/etc/resolv.conf"))
        .unwrap_or_default();
    let nameservers: Vec<&str> = resolv
        .lines()
        .filter_map(|l| l.strip_prefix("nameserver"))
        .map(str::trim)
        .collect();
    if nameservers.first() == Some(&gw.to_string().as_str()) {
        return Check::pass(
            NAME,
            format!("/etc/resolv.conf asks {gw} first: banger answers `.vm` and forwards the rest"),
        );
    }
    let also = "meanwhile `banger vm ssh NAME` works, and so does `ssh NAME.vm` after \
                `banger ssh-config --install`";
    let (case, fix) = if probe.path_exists(Path::new("/run/NetworkManager")) {
        (
            "NetworkManager manages DNS here without systemd-resolved",
            format!("follow the NetworkManager recipe in {DOC} (dnsmasq plugin, `server=/vm/{gw}`); {also}"),
        )
    } else if nameservers
        .first()
        .is_some_and(|n| n.starts_with("127.") && *n != "127.0.0.53")
    {
        (
            "a local resolver (dnsmasq or similar) answers on loopback",
            format!("follow the dnsmasq recipe in {DOC} (`server=/vm/{gw}`); {also}"),
        )
    } else {
        (
            "/etc/resolv.conf is a plain list of servers",
            format!("follow the resolv.conf recipe in {DOC}; {also}"),
        )
    };
    Check::warn(
        NAME,
        format!(
            "systemd-resolved is not running and nothing routes `.vm` to {gw}: {case}, so \
             `<vm>.vm` names do not resolve on the host"
        ),
        fix,
    )
}

/// Reads the real host.
#[derive(Debug, Clone)]
pub struct HostProbe {
    pub state_dir: PathBuf,
    pub bridge_address: Ipv4Addr,
    /// This machine as banger-vmm reads it, as the daemon does.
    system: banger_vmm::SystemHost,
}

impl HostProbe {
    pub fn new(state_dir: PathBuf, bridge_address: Ipv4Addr) -> Self {
        HostProbe {
            state_dir,
            bridge_address,
            system: banger_vmm::SystemHost::this(),
        }
    }
}

impl Probe for HostProbe {
    fn arch(&self) -> String {
        let mut uts = std::mem::MaybeUninit::<libc::utsname>::zeroed();
        // SAFETY: uname writes into the utsname buffer we own and returns 0 on success; the
        // buffer started zeroed so it is initialized either way.
        let rc = unsafe { libc::uname(uts.as_mut_ptr()) };
        // SAFETY: zeroed() initialized every byte and uname only wrote valid data into it.
        let uts = unsafe { uts.assume_init() };
        if rc != 0 {
            return std::env::consts::ARCH.to_owned();
        }
        // SAFETY: uname fills `machine` with a NUL-terminated string; the zeroed buffer
        // guarantees a terminator even if it did not.
        let machine = unsafe { CStr::from_ptr(uts.machine.as_ptr()) };
        machine.to_string_lossy().into_owned()
    }

    fn device_access(&self, path: &Path) -> Access {
        match fs::OpenOptions::new().read(true).write(true).open(path) {
            Ok(_) => Access::Ok,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Access::Missing,
            Err(e) => Access::Denied(e.to_string()),
        }
    }

    fn vmm_host(&self) -> &dyn HostFacts {
        &self.system
    }

    fn path_exists(&self, path: &Path) -> bool {
        path.exists()
    }

    fn find_program(&self, program: &str) -> Option<PathBuf> {
        // Programs in sbin count as installed: banger runs them (or sudo does) even when the
        // user's PATH lacks those directories.
        programs::find_program(program, None, &programs::SBIN_DIRS)
    }

    fn run(&self, program: &Path, args: &[&str]) -> Result<CommandOutput, String> {
        let out = Command::new(program)
            .args(args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| e.to_string())?;
        Ok(CommandOutput {
            success: out.status.success(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn is_root(&self) -> bool {
        nix::unistd::geteuid().is_root()
    }

    fn read_to_string(&self, path: &Path) -> Option<String> {
        fs::read_to_string(path).ok()
    }

    fn bridge_address(&self) -> Ipv4Addr {
        self.bridge_address
    }
    fn state_dir(&self) -> PathBuf {
        self.state_dir.clone()
    }

    fn free_bytes(&self, path: &Path) -> Result<u64, String> {
        let st = nix::sys::statvfs::statvfs(path).map_err(|e| e.to_string())?;
        Ok((st.blocks_available() as u64).saturating_mul(st.fragment_size() as u64))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_vmm::VmmSettings;
    use std::collections::{HashMap, HashSet};

    /// A host described by a few sets and maps; defaults to a healthy hardware-KVM machine.
    struct FakeProbe {
        arch: String,
        devices: HashMap<&'static str, Access>,
        modules: HashSet<&'static str>,
        paths: HashSet<PathBuf>,
        programs: HashSet<&'static str>,
        outputs: HashMap<String, Result<CommandOutput, String>>,
        root: bool,
        files: HashMap<&'static str, String>,
        free: Result<u64, String>,
    }

    fn ok(stdout: &str, stderr: &str) -> Result<CommandOutput, String> {
        Ok(CommandOutput {
            success: true,
            stdout: stdout.into(),
            stderr: stderr.into(),
        })
    }

    impl FakeProbe {
        fn healthy() -> Self {
            let outputs = [
                (
                    "firecracker --version",
                    ok("Firecracker v1.16.1\n\nExiting successfully\n", ""),
                ),
                (
                    "qemu-system-x86_64 --version",
                    ok("QEMU emulator version 7.2.15\nCopyright\n", ""),
                ),
                (
                    "nft --version",
                    ok("nftables v1.0.6 (Lester Gooch #5)\n", ""),
                ),
                (
                    "mkfs.ext4 -V",
                    ok("", "mke2fs 1.47.0 (5-Feb-2023)\n\tUsing EXT2FS Library\n"),
                ),
                (
                    "ssh -V",
                    ok("", "OpenSSH_9.2p1 Debian-2+deb12u3, OpenSSL 3.0.15\n"),
                ),
                (
                    "debootstrap --version",
                    ok("debootstrap 1.0.128+nmu2+deb12u1\n", ""),
                ),
                ("sudo -n true", ok("", "")),
            ];
            FakeProbe {
                arch: "x86_64".into(),
                devices: [
                    ("/dev/kvm", Access::Ok),
                    ("/dev/net/tun", Access::Ok),
                    ("/dev/vhost-vsock", Access::Ok),
                ]
                .into_iter()
                .collect(),
                modules: ["kvm", "kvm_intel"].into_iter().collect(),
                paths: [
                    "/",
                    "/home",
                    "/home/u",
                    "/run/systemd/resolve/io.systemd.Resolve",
                ]
                .into_iter()
                .map(PathBuf::from)
                .collect(),
                programs: [
                    "firecracker",
                    "qemu-system-x86_64",
                    "nft",
                    "mkfs.ext4",
                    "debugfs",
                    "e2fsck",
                    "ssh",
                    "ssh-keygen",
                    "sudo",
                    "debootstrap",
                ]
                .into_iter()
                .collect(),
                outputs: outputs
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), v))
                    .collect(),
                root: false,
                files: [("/proc/sys/net/ipv4/ip_forward", "1\n".to_owned())]
                    .into_iter()
                    .collect(),
                free: Ok(100 * GIB),
            }
        }

        /// This build machine: kvm_pvm, no vhost-vsock, no Firecracker, no resolved, root.
        fn this_machine() -> Self {
            let mut p = Self::healthy();
            p.modules = ["kvm", "kvm_pvm"].into_iter().collect();
            p.devices.insert("/dev/vhost-vsock", Access::Missing);
            p.programs.remove("firecracker");
            p.paths
                .remove(Path::new("/run/systemd/resolve/io.systemd.Resolve"));
            p.files
                .insert("/proc/sys/net/ipv4/ip_forward", "0\n".into());
            p.root = true;
            p
        }

        fn without(mut self, program: &'static str) -> Self {
            self.programs.remove(program);
            self
        }
    }

    impl HostFacts for FakeProbe {
        fn open_dev_kvm(&self) -> std::io::Result<()> {
            match self.device_access(Path::new("/dev/kvm")) {
                Access::Ok => Ok(()),
                Access::Missing => Err(std::io::ErrorKind::NotFound.into()),
                Access::Denied(e) => {
                    Err(std::io::Error::new(std::io::ErrorKind::PermissionDenied, e))
                }
            }
        }
        fn module_loaded(&self, name: &str) -> bool {
            self.modules.contains(name)
        }
        fn cpuinfo(&self) -> String {
            self.files.get("/proc/cpuinfo").cloned().unwrap_or_default()
        }
        fn find_on_path(&self, name: &std::ffi::OsStr) -> Option<PathBuf> {
            self.find_program(name.to_str()?)
        }
        fn is_executable(&self, path: &Path) -> bool {
            path.parent() == Some(Path::new("/usr/bin"))
                && path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| self.programs.contains(n))
        }
    }

    impl Probe for FakeProbe {
        fn arch(&self) -> String {
            self.arch.clone()
        }
        fn device_access(&self, path: &Path) -> Access {
            self.devices
                .get(path.to_str().unwrap())
                .cloned()
                .unwrap_or(Access::Missing)
        }
        fn vmm_host(&self) -> &dyn HostFacts {
            self
        }
        fn path_exists(&self, path: &Path) -> bool {
            self.paths.contains(path)
        }
        fn find_program(&self, program: &str) -> Option<PathBuf> {
            self.programs
                .contains(program)
                .then(|| PathBuf::from("/usr/bin").join(program))
        }
        fn run(&self, program: &Path, args: &[&str]) -> Result<CommandOutput, String> {
            let name = program.file_name().unwrap().to_str().unwrap();
            let key = format!("{name} {}", args.join(" "));
            self.outputs
                .get(&key)
                .cloned()
                .unwrap_or_else(|| panic!("fake probe has no output for `{key}`"))
        }
        fn is_root(&self) -> bool {
            self.root
        }
        fn read_to_string(&self, path: &Path) -> Option<String> {
            self.files.get(path.to_str().unwrap()).cloned()
        }
        fn bridge_address(&self) -> Ipv4Addr {
            Ipv4Addr::new(172, 16, 0, 1)
        }
        fn state_dir(&self) -> PathBuf {
            PathBuf::from("/home/u/.local/state/banger")
        }
        fn free_bytes(&self, path: &Path) -> Result<u64, String> {
            assert_eq!(path, Path::new("/home/u"), "measured the wrong directory");
            self.free.clone()
        }
    }

    fn find<'a>(checks: &'a [Check], name: &str) -> &'a Check {
        checks
            .iter()
            .find(|c| c.name == name)
            .unwrap_or_else(|| panic!("no check named {name}"))
    }

    fn check(probe: &FakeProbe, name: &str) -> Check {
        find(&run_checks(probe, &VmmSettings::default()), name).clone()
    }

    #[test]
    fn healthy_host_passes_everything_and_exits_zero() {
        let checks = run_checks(&FakeProbe::healthy(), &VmmSettings::default());
        for c in &checks {
            assert_eq!(c.level, Level::Pass, "{c:?}");
            assert!(c.fix.is_none());
        }
        assert_eq!(exit_code(&checks), 0);
    }

    #[test]
    fn every_check_that_is_not_pass_has_a_fix() {
        let mut probe = FakeProbe::this_machine();
        probe.arch = "aarch64".into();
        probe.programs.clear();
        probe.devices.clear();
        probe.free = Ok(GIB);
        probe.root = false;
        for c in run_checks(&probe, &VmmSettings::default()) {
            if c.level != Level::Pass {
                assert!(c.fix.as_deref().is_some_and(|f| !f.is_empty()), "{c:?}");
            }
        }
    }

    #[test]
    fn non_x86_64_arch_fails() {
        let mut probe = FakeProbe::healthy();
        probe.arch = "aarch64".into();
        let c = check(&probe, "arch");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("x86_64 hosts only"));
    }

    #[test]
    fn this_machine_kvm_pvm_is_nested_software_mode_with_qemu_fallback() {
        let checks = run_checks(&FakeProbe::this_machine(), &VmmSettings::default());
        let mode = find(&checks, "kvm-mode");
        assert_eq!(mode.level, Level::Warn);
        assert!(
            mode.detail.contains("nested software mode"),
            "{}",
            mode.detail
        );
        assert!(mode.detail.contains("QEMU (TCG)"), "{}", mode.detail);
        let qemu = find(&checks, "qemu");
        assert_eq!(qemu.level, Level::Pass);
        assert!(
            qemu.detail.contains("new VMs run on it: qemu (TCG)"),
            "{}",
            qemu.detail
        );
        assert_eq!(find(&checks, "firecracker").level, Level::Pass);
        assert_eq!(find(&checks, "vhost-vsock").level, Level::Warn);
        assert_eq!(exit_code(&checks), 0, "{}", render_text(&checks));
    }

    #[test]
    fn hardware_kvm_modules_pass() {
        let mut probe = FakeProbe::healthy();
        probe.modules = ["kvm", "kvm_amd"].into_iter().collect();
        let c = check(&probe, "kvm-mode");
        assert_eq!(c.level, Level::Pass);
        assert!(c.detail.contains("kvm_amd"));
    }

    #[test]
    fn no_kvm_module_warns_and_names_fallback() {
        let mut probe = FakeProbe::healthy();
        probe.modules.clear();
        let c = check(&probe, "kvm-mode");
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("QEMU (TCG)"));
        assert!(c.fix.unwrap().contains("modprobe"));
    }

    #[test]
    fn missing_or_denied_dev_kvm_warns() {
        let mut probe = FakeProbe::healthy();
        probe.devices.insert("/dev/kvm", Access::Missing);
        let c = check(&probe, "kvm-device");
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("does not exist"));
        probe
            .devices
            .insert("/dev/kvm", Access::Denied("Permission denied".into()));
        let c = check(&probe, "kvm-device");
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("Permission denied"));
        assert!(c.fix.unwrap().contains("kvm group"));
    }

    #[test]
    fn firecracker_version_is_reported() {
        let c = check(&FakeProbe::healthy(), "firecracker");
        assert_eq!(c.level, Level::Pass);
        assert!(c
            .detail
            .starts_with("Firecracker v1.16.1 at /usr/bin/firecracker"));
    }

    #[test]
    fn firecracker_without_hardware_kvm_warns() {
        let mut probe = FakeProbe::healthy();
        probe.modules = ["kvm", "kvm_pvm"].into_iter().collect();
        let c = check(&probe, "firecracker");
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail
                .contains("cannot boot ordinary guests here (/dev/kvm is kvm_pvm"),
            "{}",
            c.detail
        );
        assert!(c.detail.ends_with("qemu is used instead"), "{}", c.detail);
    }

    #[test]
    fn firecracker_missing_with_hardware_kvm_warns_and_qemu_is_used() {
        let probe = FakeProbe::healthy().without("firecracker");
        let checks = run_checks(&probe, &VmmSettings::default());
        let c = find(&checks, "firecracker");
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.as_deref().unwrap().contains("firecracker_bin"));
        let qemu = &find(&checks, "qemu").detail;
        assert!(qemu.contains("new VMs run on it: qemu (KVM)"), "{qemu}");
    }

    #[test]
    fn a_broken_firecracker_that_banger_would_use_fails() {
        // The daemon picks Firecracker here (binary and hardware KVM), so a binary that does
        // not run means VMs will not start: doctor must say so, not call it a warning.
        let mut probe = FakeProbe::healthy();
        probe.outputs.insert(
            "firecracker --version".into(),
            Err("Exec format error".into()),
        );
        let checks = run_checks(&probe, &VmmSettings::default());
        let c = find(&checks, "firecracker");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("Exec format error"), "{}", c.detail);
        assert!(
            c.detail.contains("banger runs new VMs on it"),
            "{}",
            c.detail
        );
        assert!(find(&checks, "qemu")
            .detail
            .contains("fallback; firecracker is preferred"));
    }

    #[test]
    fn the_vmm_setting_decides_what_is_used() {
        let qemu = VmmSettings {
            preference: banger_config::VmmChoice::Qemu,
            firecracker_bin: None,
        };
        let checks = run_checks(&FakeProbe::healthy(), &qemu);
        let fc = find(&checks, "firecracker");
        assert_eq!(fc.level, Level::Pass);
        assert!(fc.detail.contains("not used"), "{}", fc.detail);
        let q = &find(&checks, "qemu").detail;
        assert!(
            q.contains("new VMs run on it: qemu (KVM): configured"),
            "{q}"
        );

        // Firecracker named on a host whose KVM cannot run it: nothing starts VMs.
        let firecracker = VmmSettings {
            preference: banger_config::VmmChoice::Firecracker,
            firecracker_bin: None,
        };
        let mut probe = FakeProbe::healthy();
        probe.devices.insert("/dev/kvm", Access::Missing);
        let checks = run_checks(&probe, &firecracker);
        let fc = find(&checks, "firecracker");
        assert_eq!(fc.level, Level::Fail);
        assert!(fc.detail.contains("no VMM can start VMs"), "{}", fc.detail);
        assert!(fc.fix.as_deref().unwrap().contains("vmm = \"qemu\""));
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn a_configured_firecracker_bin_is_what_is_checked() {
        let mut probe = FakeProbe::healthy().without("firecracker");
        probe.programs.insert("fc-1.16");
        probe
            .outputs
            .insert("fc-1.16 --version".into(), ok("Firecracker v1.16.1\n", ""));
        let settings = VmmSettings {
            preference: banger_config::VmmChoice::Auto,
            firecracker_bin: Some(PathBuf::from("/usr/bin/fc-1.16")),
        };
        let c = find(&run_checks(&probe, &settings), "firecracker").clone();
        assert_eq!(c.level, Level::Pass, "{c:?}");
        assert!(
            c.detail.contains("at /usr/bin/fc-1.16; new VMs run on it"),
            "{}",
            c.detail
        );
    }

    #[test]
    fn kvm_pvm_wins_over_a_vendor_module_as_in_the_daemon() {
        // Both loaded: kvm_pvm is what serves /dev/kvm (banger-vmm's rule); doctor used to
        // call this hardware KVM while the daemon fell back to TCG.
        let mut probe = FakeProbe::healthy();
        probe.modules.insert("kvm_pvm");
        let checks = run_checks(&probe, &VmmSettings::default());
        assert_eq!(find(&checks, "kvm-mode").level, Level::Warn);
        assert!(find(&checks, "qemu").detail.contains("qemu (TCG)"));
    }

    #[test]
    fn qemu_missing_without_usable_firecracker_fails_with_apt_hint() {
        let probe = FakeProbe::this_machine().without("qemu-system-x86_64");
        let checks = run_checks(&probe, &VmmSettings::default());
        let c = find(&checks, "qemu");
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.fix
                .as_deref()
                .unwrap()
                .contains("apt-get install qemu-system-x86"),
            "{c:?}"
        );
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn qemu_missing_with_firecracker_and_hardware_kvm_only_warns() {
        let probe = FakeProbe::healthy().without("qemu-system-x86_64");
        let c = check(&probe, "qemu");
        assert_eq!(c.level, Level::Warn);
        assert!(c.fix.unwrap().contains("apt-get install qemu-system-x86"));
    }

    #[test]
    fn qemu_version_failure_without_firecracker_fails() {
        let mut probe = FakeProbe::this_machine();
        probe.outputs.insert(
            "qemu-system-x86_64 --version".into(),
            Ok(CommandOutput {
                success: false,
                stdout: String::new(),
                stderr: "error while loading shared libraries\n".into(),
            }),
        );
        let c = check(&probe, "qemu");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("error while loading shared libraries"));
    }

    #[test]
    fn tun_missing_fails_and_denied_warns() {
        let mut probe = FakeProbe::healthy();
        probe.devices.insert("/dev/net/tun", Access::Missing);
        let c = check(&probe, "tun");
        assert_eq!(c.level, Level::Fail);
        assert_eq!(c.fix.as_deref(), Some("sudo modprobe tun"));
        probe
            .devices
            .insert("/dev/net/tun", Access::Denied("Permission denied".into()));
        assert_eq!(check(&probe, "tun").level, Level::Warn);
    }

    #[test]
    fn vhost_vsock_missing_warns_about_virtio_serial_fallback() {
        let mut probe = FakeProbe::healthy();
        probe.devices.insert("/dev/vhost-vsock", Access::Missing);
        let c = check(&probe, "vhost-vsock");
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("virtio-serial"));
    }

    #[test]
    fn ip_forward_off_is_fine_because_banger_enables_it() {
        let mut probe = FakeProbe::healthy();
        probe
            .files
            .insert("/proc/sys/net/ipv4/ip_forward", "0\n".into());
        let c = check(&probe, "ip-forward");
        assert_eq!(c.level, Level::Pass);
        assert!(c.detail.contains("banger turns it on when a VM starts"));
        probe.files.clear();
        assert_eq!(check(&probe, "ip-forward").level, Level::Warn);
    }

    #[test]
    fn nft_missing_fails() {
        let c = check(&FakeProbe::healthy().without("nft"), "nft");
        assert_eq!(c.level, Level::Fail);
        assert_eq!(c.fix.as_deref(), Some("sudo apt-get install nftables"));
        let ok = check(&FakeProbe::healthy(), "nft");
        assert!(ok.detail.starts_with("nftables v1.0.6"));
    }

    #[test]
    fn e2fsprogs_names_every_missing_tool() {
        let probe = FakeProbe::healthy().without("debugfs").without("e2fsck");
        let c = check(&probe, "e2fsprogs");
        assert_eq!(c.level, Level::Fail);
        assert!(
            c.detail.starts_with("debugfs, e2fsck not found"),
            "{}",
            c.detail
        );
        assert_eq!(c.fix.as_deref(), Some("sudo apt-get install e2fsprogs"));
        let ok = check(&FakeProbe::healthy(), "e2fsprogs");
        assert!(ok.detail.starts_with("mke2fs 1.47.0"), "{}", ok.detail);
    }

    #[test]
    fn ssh_client_and_keygen_are_required() {
        let c = check(&FakeProbe::healthy().without("ssh-keygen"), "ssh");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("ssh-keygen"));
        assert!(c.fix.unwrap().contains("openssh-client"));
        let ok = check(&FakeProbe::healthy(), "ssh");
        assert!(ok.detail.starts_with("OpenSSH_9.2p1"), "{}", ok.detail);
    }

    #[test]
    fn sudo_rules() {
        let mut probe = FakeProbe::healthy();
        probe.root = true;
        probe.outputs.remove("sudo -n true");
        assert!(check(&probe, "sudo").detail.contains("running as root"));

        let mut probe = FakeProbe::healthy();
        assert!(check(&probe, "sudo")
            .detail
            .contains("passwordless sudo works"));
        probe.outputs.insert(
            "sudo -n true".into(),
            Ok(CommandOutput {
                success: false,
                stdout: String::new(),
                stderr: "sudo: a password is required\n".into(),
            }),
        );
        let c = check(&probe, "sudo");
        assert_eq!(c.level, Level::Fail);
        assert!(c.fix.unwrap().contains("sudoers.d"));

        let c = check(&FakeProbe::healthy().without("sudo"), "sudo");
        assert_eq!(c.level, Level::Fail);
        assert!(c.detail.contains("sudo not found"));
    }

    #[test]
    fn debootstrap_missing_only_warns() {
        let c = check(&FakeProbe::healthy().without("debootstrap"), "debootstrap");
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("local image builds"));
    }

    #[test]
    fn disk_thresholds() {
        let mut probe = FakeProbe::healthy();
        probe.free = Ok(10 * GIB);
        assert_eq!(check(&probe, "disk").level, Level::Pass);
        probe.free = Ok(10 * GIB - 1);
        let c = check(&probe, "disk");
        assert_eq!(c.level, Level::Warn);
        assert!(
            c.detail.contains("/home/u/.local/state/banger"),
            "{}",
            c.detail
        );
        probe.free = Ok(2 * GIB - 1);
        assert_eq!(check(&probe, "disk").level, Level::Fail);
        probe.free = Ok(2 * GIB);
        assert_eq!(check(&probe, "disk").level, Level::Warn);
        probe.free = Err("Input/output error".into());
        assert_eq!(check(&probe, "disk").level, Level::Warn);
    }

    #[test]
    fn dns_check_says_which_routing_case_applies() {
        let c = check(&FakeProbe::healthy(), "dns");
        assert_eq!(c.level, Level::Pass);
        assert!(c.detail.contains("systemd-resolved runs"), "{}", c.detail);

        // No resolved, plain resolv.conf (this machine).
        let mut p = FakeProbe::this_machine();
        p.files
            .insert("/etc/resolv.conf", "nameserver 192.0.2.53\n".into());
        let c = check(&p, "dns");
        assert_eq!(c.level, Level::Warn);
        assert!(c.detail.contains("plain list of servers"), "{}", c.detail);
        let fix = c.fix.unwrap();
        assert!(
            fix.contains("resolv.conf recipe in docs/dns-routing.md"),
            "{fix}"
        );
        assert!(fix.contains("banger ssh-config --install"), "{fix}");

        // A local dnsmasq, then the same with banger's route in place.
        p.files
            .insert("/etc/resolv.conf", "nameserver 127.0.0.1\n".into());
        let c = check(&p, "dns");
        assert!(c.fix.unwrap().contains("dnsmasq recipe"));
        p.files.insert(
            "/etc/dnsmasq.d/banger.conf",
            "server=/vm/172.16.0.1\n".into(),
        );
        let c = check(&p, "dns");
        assert_eq!(c.level, Level::Pass);
        assert!(c.detail.contains("/etc/dnsmasq.d/banger.conf"));

        // NetworkManager without resolved.
        let mut p = FakeProbe::this_machine();
        p.paths.insert(PathBuf::from("/run/NetworkManager"));
        let c = check(&p, "dns");
        assert!(c.fix.unwrap().contains("NetworkManager recipe"));

        // resolv.conf asks banger first.
        let mut p = FakeProbe::this_machine();
        p.files.insert(
            "/etc/resolv.conf",
            "nameserver 172.16.0.1\nnameserver 192.0.2.53\n".into(),
        );
        assert_eq!(check(&p, "dns").level, Level::Pass);
    }

    #[test]
    fn text_report_is_aligned_with_fix_below() {
        let checks = vec![
            Check::pass("arch", "x86_64"),
            Check::fail(
                "e2fsprogs",
                "mkfs.ext4 not found",
                "sudo apt-get install e2fsprogs",
            ),
            Check::warn("tun", "denied", "chmod"),
        ];
        let text = render_text(&checks);
        let expected = "\
[pass] arch       x86_64
[FAIL] e2fsprogs  mkfs.ext4 not found
                  fix: sudo apt-get install e2fsprogs
[warn] tun        denied
                  fix: chmod

3 checks: 1 passed, 1 warning, 1 failed
";
        assert_eq!(text, expected);
        assert_eq!(exit_code(&checks), 1);
    }

    #[test]
    fn json_uses_lowercase_levels_and_null_fix() {
        let json = serde_json::to_value(vec![Check::pass("arch", "x86_64")]).unwrap();
        assert_eq!(
            json,
            serde_json::json!([{"name": "arch", "level": "pass", "detail": "x86_64", "fix": null}])
        );
    }

    /// The real probe on this machine, which the brief describes: kvm_pvm, root, no vhost-vsock.
    #[test]
    fn host_probe_reads_this_machine() {
        let probe = HostProbe::new(
            std::env::temp_dir().join("banger-doctor-test/state"),
            Ipv4Addr::new(172, 16, 0, 1),
        );
        assert_eq!(probe.arch(), "x86_64");
        assert!(
            probe.find_program("mkfs.ext4").is_some(),
            "e2fsprogs is installed here"
        );
        assert!(probe.free_bytes(Path::new("/")).unwrap() > 0);
        let checks = run_checks(&probe, &VmmSettings::default());
        let text = render_text(&checks);
        // Visible with --nocapture: the report as a user on this machine would see it.
        println!("{text}");
        assert_eq!(find(&checks, "arch").level, Level::Pass, "{text}");
        if probe.vmm_host().module_loaded("kvm_pvm") {
            assert!(
                find(&checks, "kvm-mode")
                    .detail
                    .contains("nested software mode"),
                "{text}"
            );
        }
    }
}
