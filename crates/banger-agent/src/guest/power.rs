//! Powering the guest off on the host's request: through systemd when it is the init system
//! (so services stop cleanly and file systems unmount), otherwise with `sync` and
//! `reboot(RB_POWER_OFF)` directly.
//!
//! Behind a trait so the serve loop can be tested without switching anything off.

use std::path::Path;
use std::process::Command;

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

/// systemd's own test (`sd_booted`): it creates this directory when it is PID 1.
fn booted_with_systemd() -> bool {
    Path::new("/run/systemd/system").is_dir()
}
