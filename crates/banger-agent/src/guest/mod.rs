//! The guest agent: what `banger-agent` does inside a VM.
//!
//! At start it applies the per-boot settings from the kernel command line, in order — host
//! name, network, DNS, clock, work disk — makes sure sshd has a host key, then tells systemd it is ready and serves the host
//! channel for the rest of the VM's life. Every setup step logs one line; a step that fails is
//! logged and the others still run, because a half-configured guest that answers `vm exec` is
//! far easier to debug than one whose agent gave up.
//!
//! Images without an init system (OCI images) run the agent as PID 1 ([`init`]): it mounts the
//! root itself, stays PID 1 to reap orphans and power off, and runs this same agent as its child.
//!
//! Everything here is synchronous std code (threads, blocking I/O) so the binary stays small
//! and links statically; the host side of the protocol lives in [`crate::host`].

pub mod clock;
pub mod dns;
pub mod exec;
mod fsutil;
pub mod hostname;
pub mod identity;
pub mod init;
pub mod network;
pub mod notify;
pub mod power;
pub mod pty;
pub mod serve;
pub mod sshkeys;
pub mod transport;
pub mod users;
pub mod workdisk;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::cmdline::{self, BootSettings, PROC_CMDLINE};
use crate::protocol::AGENT_VERSION;
use serve::{log, report};

/// Where the setup steps act; the defaults are the real guest's.
#[derive(Debug, Clone)]
pub struct SetupConfig {
    /// The guest's `/etc`.
    pub etc: PathBuf,
    /// The VM's network interface.
    pub interface: String,
    /// The work disk's block device.
    pub work_device: PathBuf,
    /// Where the work disk is mounted: root's home.
    pub home: PathBuf,
    /// How long to wait for the interface and the work disk to appear.
    pub device_wait: Duration,
}

impl Default for SetupConfig {
    fn default() -> Self {
        SetupConfig {
            etc: PathBuf::from("/etc"),
            interface: "eth0".to_string(),
            work_device: PathBuf::from("/dev/vdb"),
            home: PathBuf::from("/root"),
            device_wait: Duration::from_secs(10),
        }
    }
}

/// The agent's main: set up, notify systemd, serve. Never returns. As PID 1 (images without
/// an init system) the agent is [`init::run`] instead.
pub fn run() -> ! {
    log(format_args!("starting, version {AGENT_VERSION}"));
    let settings = read_boot_settings();
    setup(&settings, &SetupConfig::default());
    match notify::notify_ready() {
        Ok(true) => log(format_args!("systemd: notified ready")),
        Ok(false) => log(format_args!(
            "systemd: not started by systemd, nothing to notify"
        )),
        Err(e) => log(format_args!("systemd: {}", report(&e))),
    }
    transport::serve_forever(Arc::new(serve::ServeConfig::guest()))
}

/// Where the settings a `reidentify` applied are kept for the rest of this boot (`/run` is a
/// tmpfs). A guest restored from a snapshot inherited the command line of the VM that was
/// snapshotted, so an agent restarted by systemd must not go back to those.
pub(crate) const REIDENTIFIED_SETTINGS: &str = "/run/banger-agent/boot-settings";

/// The `banger.*` settings of this VM: those a `reidentify` applied during this boot, else the
/// kernel command line's; none when neither can be read.
pub(crate) fn read_boot_settings() -> BootSettings {
    if let Ok(line) = fs_err::read_to_string(REIDENTIFIED_SETTINGS) {
        log(format_args!(
            "settings: from {REIDENTIFIED_SETTINGS} (this guest was reidentified)"
        ));
        return settings_from(&line);
    }
    match fs_err::read_to_string(PROC_CMDLINE) {
        Ok(line) => settings_from(&line),
        Err(e) => {
            log(format_args!(
                "command line: cannot read it, applying nothing: {e}"
            ));
            BootSettings::default()
        }
    }
}

fn settings_from(line: &str) -> BootSettings {
    let parsed = cmdline::parse(line);
    for w in &parsed.warnings {
        log(format_args!("command line: {w}"));
    }
    parsed.settings
}

/// Runs every setup step for `settings`, logging one line per step.
pub fn setup(settings: &BootSettings, cfg: &SetupConfig) {
    step("hostname", || match &settings.hostname {
        None => Ok("none on the command line; left as is".into()),
        Some(name) => {
            hostname::apply(name, &cfg.etc)?;
            Ok(format!("set to {name}"))
        }
    });
    step("network", || setup_network(settings, cfg));
    step("dns", || {
        if settings.dns.is_empty() {
            return Ok("none on the command line; left as is".into());
        }
        dns::write_resolv_conf(&cfg.etc, &settings.dns)?;
        let list: Vec<String> = settings.dns.iter().map(ToString::to_string).collect();
        Ok(format!("resolv.conf points at {}", list.join(", ")))
    });
    step("clock", || match settings.time {
        None => Ok("no host time on the command line; left as is".into()),
        Some(secs) => Ok(match clock::sync_forward(secs)? {
            clock::ClockOutcome::Advanced(by) => format!("moved forward {by}s to the host's time"),
            clock::ClockOutcome::AlreadyCurrent => "already current".into(),
        }),
    });
    step("work disk", || {
        let outcome = workdisk::mount_work_disk(&cfg.work_device, &cfg.home, cfg.device_wait)?;
        workdisk::fix_home_permissions(&cfg.home)?;
        Ok(match outcome {
            workdisk::MountOutcome::Mounted => format!(
                "{} mounted at {}; permissions fixed",
                cfg.work_device.display(),
                cfg.home.display()
            ),
            workdisk::MountOutcome::AlreadyMounted => {
                format!("{} already mounted; permissions fixed", cfg.home.display())
            }
        })
    });
    step("ssh host key", || {
        Ok(match sshkeys::ensure_host_key(&cfg.etc)? {
            sshkeys::HostKeyOutcome::NoSsh => "no /etc/ssh; nothing to do".into(),
            sshkeys::HostKeyOutcome::AlreadyPresent => "present".into(),
            sshkeys::HostKeyOutcome::Created(key) => format!("created {}", key.display()),
        })
    });
}

fn setup_network(settings: &BootSettings, cfg: &SetupConfig) -> Result<String, StepError> {
    network::set_link_up("lo")?;
    let Some(cidr) = settings.ip else {
        if settings.gateway.is_some() {
            return Ok("lo up; banger.gw without banger.ip ignored".into());
        }
        return Ok("lo up; no address on the command line".into());
    };
    network::wait_for_interface(&cfg.interface, cfg.device_wait)?;
    let route = network::configure(&cfg.interface, cidr, settings.gateway)?;
    let route = match (route, settings.gateway) {
        (network::RouteOutcome::Added, Some(gw)) => format!(", default route via {gw}"),
        (network::RouteOutcome::AlreadyPresent, _) => ", default route already present".into(),
        _ => ", no gateway".into(),
    };
    Ok(format!("lo up; {} has {cidr}{route}", cfg.interface))
}

type StepError = Box<dyn std::error::Error + Send + Sync>;

fn step(name: &str, f: impl FnOnce() -> Result<String, StepError>) {
    match f() {
        Ok(done) => log(format_args!("{name}: {done}")),
        Err(e) => log(format_args!("{name}: FAILED: {}", report(e.as_ref()))),
    }
}
