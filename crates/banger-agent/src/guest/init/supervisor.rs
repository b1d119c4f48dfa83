//! PID 1's life after the switch: keep the agent running, reap every process that ends up
//! orphaned (they are re-parented to PID 1, and an init that does not wait for them leaves
//! zombies), and power off cleanly when asked.
//!
//! PID 1 stays single-threaded (so forking the agent is safe) and handles signals
//! synchronously: the ones it acts on are blocked and read from a signalfd. The kernel drops
//! signals to PID 1 for which it has no handler, but never blocked ones, so this is also how
//! `SIGUSR2` from the agent and `SIGINT` for Ctrl-Alt-Del (with `reboot(RB_DISABLE_CAD)`) get
//! through.
//!
//! The ACPI power button ([`button`]) powers off too: it is how QEMU asks for a graceful stop.
//!
//! Power-off: every process gets `SIGTERM`, then up to 5 s to end, then `SIGKILL`; then
//! `sync`, the work disk (`/root`) is unmounted (lazily if still busy), `/` is remounted
//! read-only (ext4 writes its journal out and marks itself clean), and `reboot(RB_POWER_OFF)`.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::button;
use crate::guest::power::INIT_POWEROFF_SIGNAL;
use crate::guest::serve::log;
use crate::guest::workdisk::is_mount_point;

/// How long processes get to end after `SIGTERM`.
pub const TERM_GRACE: Duration = Duration::from_secs(5);
/// How long to wait for processes after `SIGKILL`.
const KILL_GRACE: Duration = Duration::from_secs(2);
/// The work disk's mount point, unmounted before power-off.
const WORK_DISK_MOUNT: &str = "/root";

/// What PID 1 does about a signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Reap,
    PowerOff(&'static str),
    Ignore,
}

/// The signals PID 1 acts on.
pub const HANDLED: [Signal; 4] = [
    Signal::SIGCHLD,
    INIT_POWEROFF_SIGNAL,
    Signal::SIGTERM,
    Signal::SIGINT,
];

pub fn action_for(signal: Signal) -> Action {
    match signal {
        Signal::SIGCHLD => Action::Reap,
        s if s == INIT_POWEROFF_SIGNAL => Action::PowerOff("the agent asked (vm stop)"),
        Signal::SIGTERM => Action::PowerOff("SIGTERM"),
        Signal::SIGINT => Action::PowerOff("Ctrl-Alt-Del"),
        _ => Action::Ignore,
    }
}

/// The delay before restarting an agent that exited: short at first, doubling while it keeps
/// failing, back to short once it ran for a while.
#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    healthy_after: Duration,
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            min: Duration::from_millis(500),
            max: Duration::from_secs(30),
            healthy_after: Duration::from_secs(60),
            next: Duration::from_millis(500),
        }
    }
}

impl Backoff {
    /// The delay before the next start of an agent that ran for `ran`.
    pub fn after_exit(&mut self, ran: Duration) -> Duration {
        if ran >= self.healthy_after {
            self.next = self.min;
        }
        let delay = self.next;
        self.next = (self.next * 2).min(self.max);
        delay
    }
}

/// Blocks [`HANDLED`] and returns a signalfd for them. Must run before any child is started,
/// so no signal arrives unhandled in between.
pub fn block_signals() -> nix::Result<SignalFd> {
    let mut set = SigSet::empty();
    for s in HANDLED {
        set.add(s);
    }
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)
}

/// Undoes [`block_signals`] in a child, which must not inherit PID 1's mask.
pub fn unblock_signals() -> nix::Result<()> {
    sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None)
}

/// What woke PID 1 up.
#[derive(Debug, Default)]
struct Wake {
    signals: Vec<Signal>,
    power_button: bool,
}

/// Waits up to `timeout` (forever when `None`) for signals or a power-button press.
fn wait(sfd: &SignalFd, buttons: &mut [File], timeout: Option<Duration>) -> Wake {
    let timeout = match timeout {
        None => PollTimeout::NONE,
        Some(d) => PollTimeout::try_from(d).unwrap_or(PollTimeout::MAX),
    };
    let mut wake = Wake::default();
    let ready: Vec<bool> = {
        let mut fds = vec![PollFd::new(sfd.as_fd(), PollFlags::POLLIN)];
        fds.extend(
            buttons
                .iter()
                .map(|b| PollFd::new(b.as_fd(), PollFlags::POLLIN)),
        );
        match poll(&mut fds, timeout) {
            Ok(0) | Err(_) => return wake,
            Ok(_) => {}
        }
        fds.iter()
            .map(|f| f.revents().is_some_and(|r| !r.is_empty()))
            .collect()
    };
    if ready.first() == Some(&true) {
        while let Ok(Some(info)) = sfd.read_signal() {
            if let Ok(s) = Signal::try_from(info.ssi_signo as i32) {
                wake.signals.push(s);
            }
        }
    }
    for (button, _) in buttons.iter_mut().zip(&ready[1..]).filter(|(_, r)| **r) {
        match button::read_press(button) {
            Ok(pressed) => wake.power_button |= pressed,
            Err(e) => log(format_args!("init: reading the power button failed: {e}")),
        }
    }
    wake
}

fn wait_signals(sfd: &SignalFd, timeout: Option<Duration>) -> Vec<Signal> {
    wait(sfd, &mut [], timeout).signals
}

/// Reaps every child that has ended; returns them.
fn reap_all() -> Vec<(Pid, WaitStatus)> {
    let mut ended = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return ended,
            Ok(status) => {
                if let Some(pid) = status.pid() {
                    ended.push((pid, status));
                }
            }
            Err(Errno::EINTR) => {}
            Err(e) => {
                log(format_args!("init: waitpid failed: {e}"));
                return ended;
            }
        }
    }
}

/// Reaps until no child is left or `timeout` passed; returns whether children are left.
fn reap_until_none(sfd: &SignalFd, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        reap_all();
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Err(Errno::ECHILD) => return false,
            Ok(WaitStatus::StillAlive) => {}
            _ => continue,
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        wait_signals(sfd, Some(left));
    }
}

fn describe(status: &WaitStatus) -> String {
    match status {
        WaitStatus::Exited(_, code) => format!("exited with status {code}"),
        WaitStatus::Signaled(_, sig, _) => format!("was killed by {sig}"),
        other => format!("{other:?}"),
    }
}

/// Runs the agent (started by `spawn`) and reaps orphans until a power-off is asked for
/// (a signal, or a press of one of `buttons`).
pub fn supervise(sfd: &SignalFd, buttons: &mut [File], spawn: &dyn Fn() -> nix::Result<Pid>) -> ! {
    let mut backoff = Backoff::default();
    let mut agent: Option<(Pid, Instant)> = None;
    let mut respawn_at = Some(Instant::now());
    loop {
        if respawn_at.is_some_and(|at| Instant::now() >= at) {
            match spawn() {
                Ok(pid) => {
                    log(format_args!("init: agent started as process {pid}"));
                    agent = Some((pid, Instant::now()));
                    respawn_at = None;
                }
                Err(e) => {
                    let delay = backoff.after_exit(Duration::ZERO);
                    log(format_args!(
                        "init: cannot start the agent ({e}); retrying in {delay:?}"
                    ));
                    respawn_at = Some(Instant::now() + delay);
                }
            }
        }
        let timeout = respawn_at.map(|at| at.saturating_duration_since(Instant::now()));
        let wake = wait(sfd, buttons, timeout);
        for signal in wake.signals {
            match action_for(signal) {
                Action::Reap | Action::Ignore => {}
                Action::PowerOff(reason) => power_off(sfd, reason),
            }
        }
        if wake.power_button {
            power_off(sfd, "ACPI power button");
        }
        // Reap on every wake-up: SIGCHLDs coalesce, and a wake-up by timeout must not leave a
        // zombie waiting for the next signal.
        for (pid, status) in reap_all() {
            if let Some((agent_pid, started)) = agent {
                if pid == agent_pid {
                    let delay = backoff.after_exit(started.elapsed());
                    log(format_args!(
                        "init: the agent {}; restarting it in {delay:?}",
                        describe(&status)
                    ));
                    agent = None;
                    respawn_at = Some(Instant::now() + delay);
                }
            }
        }
    }
}

/// Ends every process, unmounts, and switches the VM off. Never returns.
pub fn power_off(sfd: &SignalFd, reason: &str) -> ! {
    log(format_args!(
        "init: powering off ({reason}); stopping all processes"
    ));
    let started = Instant::now();
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    if reap_until_none(sfd, TERM_GRACE) {
        log(format_args!(
            "init: processes still running after {TERM_GRACE:?}; killing them"
        ));
        let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
        reap_until_none(sfd, KILL_GRACE);
    }
    nix::unistd::sync();
    unmount_work_disk();
    match mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY,
        None::<&str>,
    ) {
        Ok(()) => log(format_args!("init: / remounted read-only")),
        Err(e) => log(format_args!("init: cannot remount / read-only: {e}")),
    }
    nix::unistd::sync();
    log(format_args!(
        "init: file systems synced after {:?}; power off",
        started.elapsed()
    ));
    halt()
}

fn unmount_work_disk() {
    let path = Path::new(WORK_DISK_MOUNT);
    let mounted = std::fs::read_to_string("/proc/self/mountinfo")
        .map(|info| is_mount_point(&info, path))
        .unwrap_or(true);
    if !mounted {
        return;
    }
    match umount2(path, MntFlags::empty()) {
        Ok(()) => log(format_args!("init: {WORK_DISK_MOUNT} unmounted")),
        Err(Errno::EBUSY) => match umount2(path, MntFlags::MNT_DETACH) {
            Ok(()) => log(format_args!(
                "init: {WORK_DISK_MOUNT} busy; detached lazily"
            )),
            Err(e) => log(format_args!("init: cannot unmount {WORK_DISK_MOUNT}: {e}")),
        },
        Err(e) => log(format_args!("init: cannot unmount {WORK_DISK_MOUNT}: {e}")),
    }
}

/// `reboot(RB_POWER_OFF)`; PID 1 must never exit (the kernel panics), so on failure it waits.
pub fn halt() -> ! {
    nix::unistd::sync();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    log(format_args!(
        "init: reboot(RB_POWER_OFF) failed: {e}; halting here"
    ));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_map_to_reaping_or_power_off() {
        assert_eq!(action_for(Signal::SIGCHLD), Action::Reap);
        assert!(
            matches!(action_for(Signal::SIGUSR2), Action::PowerOff(r) if r.contains("vm stop"))
        );
        assert_eq!(action_for(Signal::SIGINT), Action::PowerOff("Ctrl-Alt-Del"));
        assert_eq!(action_for(Signal::SIGTERM), Action::PowerOff("SIGTERM"));
        assert_eq!(action_for(Signal::SIGHUP), Action::Ignore);
        for s in HANDLED {
            assert_ne!(
                action_for(s),
                Action::Ignore,
                "{s} is blocked but not handled"
            );
        }
    }

    #[test]
    fn restarts_back_off_while_failing_and_recover_after_a_healthy_run() {
        let mut b = Backoff::default();
        let quick = Duration::from_millis(10);
        let delays: Vec<u64> = (0..9)
            .map(|_| b.after_exit(quick).as_millis() as u64)
            .collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 8000, 16000, 30000, 30000, 30000]
        );
        assert_eq!(
            b.after_exit(Duration::from_secs(120)),
            Duration::from_millis(500)
        );
        assert_eq!(b.after_exit(quick), Duration::from_secs(1));
    }
}
