//! Powering the guest off on the host's request: through systemd when it is the init system
//! (so services stop cleanly and file systems unmount), through the agent's own init
//! ([`InitPower`], when the agent runs as PID 1 in images without one), otherwise with `sync`
//! and `reboot(RB_POWER_OFF)` directly.
//!
//! Behind a trait so the serve loop can be tested without switching anything off.

use std::path::Path;
use std::process::Command;

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Something that can switch the guest off.
pub trait PowerControl: Send + Sync {
    /// Starts powering off. `accepted` must be called exactly once, with `Ok` once the
    /// shutdown is underway or `Err(reason)` if it could not be started, and before anything
    /// that takes the agent down — the host waits for that answer.
    fn power_off(&self, accepted: &dyn Fn(Result<(), String>));
}

/// The real thing.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemPower;

impl PowerControl for SystemPower {
    fn power_off(&self, accepted: &dyn Fn(Result<(), String>)) {
        if booted_with_systemd() {
            // `systemctl poweroff` only queues the shutdown job and returns, so the answer
            // still gets out before systemd stops the agent.
            let result = match Command::new("systemctl").arg("poweroff").status() {
                Ok(s) if s.success() => Ok(()),
                Ok(s) => Err(format!("`systemctl poweroff` failed ({s})")),
                Err(e) => Err(format!("cannot run `systemctl poweroff`: {e}")),
            };
            accepted(result);
            return;
        }
        // Without an init system to do it, the agent is the one that switches off: answer
        // first, since nothing runs after reboot(2) succeeds.
        accepted(Ok(()));
        nix::unistd::sync();
        let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
        eprintln!("banger-agent: poweroff: reboot(RB_POWER_OFF) failed: {e}");
    }
}

/// Power-off when the agent itself is the init system: the serving agent is PID 1's child,
/// and asks PID 1 (with `SIGUSR2`) to end every process, unmount and switch off
/// ([`crate::guest::init`]).
#[derive(Debug, Default, Clone, Copy)]
pub struct InitPower;

/// The signal with which the agent asks its init (PID 1) to power off.
pub const INIT_POWEROFF_SIGNAL: Signal = Signal::SIGUSR2;

impl PowerControl for InitPower {
    fn power_off(&self, accepted: &dyn Fn(Result<(), String>)) {
        // Answer first: PID 1 ends this process as part of the shutdown.
        accepted(Ok(()));
        if let Err(e) = kill(Pid::from_raw(1), INIT_POWEROFF_SIGNAL) {
            eprintln!("banger-agent: poweroff: cannot signal init (PID 1): {e}");
        }
    }
}

/// systemd's own test (`sd_booted`): it creates this directory when it is PID 1.
fn booted_with_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}
