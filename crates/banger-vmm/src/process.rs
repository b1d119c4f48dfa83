//! VMM process supervision: spawning a VMM detached from the daemon, recognising it again later,
//! signalling it safely, and waiting for it to be gone.
//!
//! A VMM must outlive a daemon restart, so it runs in its own session with stdin on /dev/null and
//! its output in a file, and is spawned with std's `Command` (tokio's children are tied to the
//! runtime). A pid alone is not an identity: the pair (pid, start time from `/proc/<pid>/stat`) is.
//! Signals go through a pidfd opened *before* the identity check, so a recycled pid is never hit.
//! A VMM that exits while the daemon that spawned it is still running becomes a zombie child:
//! [`is_alive`] reaps it. After a daemon restart the VMM is no longer our child; its new parent
//! reaps it and we only watch `/proc`.

use std::ffi::OsString;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot open its output log")]
    Log(#[source] io::Error),
    #[error("cannot spawn {program}")]
    Spawn {
        program: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("process {pid} vanished right after spawning, before its start time could be read")]
    Vanished { pid: i32 },
    #[error("cannot write pid file")]
    PidFile(#[source] io::Error),
    #[error("cannot send {signal} to process {pid}")]
    Signal {
        pid: i32,
        signal: &'static str,
        #[source]
        source: io::Error,
    },
}

/// How the spawned process's stdout and stderr file is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LogMode {
    Append,
    Truncate,
}

/// What to run; stdout and stderr both go to `log`.
#[derive(Debug, Clone)]
pub(crate) struct SpawnSpec {
    pub program: PathBuf,
    pub args: Vec<OsString>,
    pub log: PathBuf,
    pub log_mode: LogMode,
    pub pid_file: PathBuf,
    /// Working directory; the caller's own when `None`.
    pub cwd: Option<PathBuf>,
}

/// A spawned process's identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Spawned {
    pub pid: i32,
    pub start_time: u64,
}

/// The seam between backends and the host's process table, so a test can put a fake VMM
/// behind a backend while the backend's own logic runs for real.
pub(crate) trait Launcher: Send + Sync {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned, ProcessError>;
}

/// Spawns real, detached processes.
pub(crate) struct RealLauncher;

impl Launcher for RealLauncher {
    fn spawn(&self, spec: &SpawnSpec) -> Result<Spawned, ProcessError> {
        spawn_detached(spec)
    }
}

pub(crate) fn spawn_detached(spec: &SpawnSpec) -> Result<Spawned, ProcessError> {
    let mut opts = fs_err::OpenOptions::new();
    opts.create(true);
    match spec.log_mode {
        LogMode::Append => opts.append(true),
        LogMode::Truncate => opts.write(true).truncate(true),
    };
    let out = opts.open(&spec.log).map_err(ProcessError::Log)?.into_file();
    let err = out.try_clone().map_err(ProcessError::Log)?;

    let mut cmd = Command::new(&spec.program);
    if let Some(dir) = &spec.cwd {
        cmd.current_dir(dir);
    }
    cmd.args(&spec.args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err));
    // SAFETY: the closure runs in the forked child before exec and only calls setsid(2), which
    // is async-signal-safe and touches no memory shared with the parent. A new session puts the
    // VMM out of reach of signals to the daemon's process group and controlling terminal.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setsid() == -1 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|source| ProcessError::Spawn {
        program: spec.program.clone(),
        source,
    })?;
    let pid = i32::try_from(child.id()).map_err(|_| ProcessError::Vanished { pid: -1 })?;
    // Dropping std's Child neither kills nor waits: the process stays ours to reap later.
    drop(child);

    // A zombie still has its stat file, so this only fails if something else reaped it.
    let start_time = proc_stat(pid)
        .map(|s| s.start_time)
        .ok_or(ProcessError::Vanished { pid })?;
    write_pid_file(&spec.pid_file, pid).map_err(ProcessError::PidFile)?;
    Ok(Spawned { pid, start_time })
}

fn write_pid_file(path: &Path, pid: i32) -> io::Result<()> {
    let tmp = path.with_extension("pid.tmp");
    fs_err::write(&tmp, format!("{pid}\n"))?;
    fs_err::rename(&tmp, path)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub state: char,
    pub ppid: i32,
    pub start_time: u64,
}

impl ProcStat {
    fn is_zombie(&self) -> bool {
        matches!(self.state, 'Z' | 'X')
    }

    fn is_our_child(&self) -> bool {
        u32::try_from(self.ppid).is_ok_and(|p| p == std::process::id())
    }
}

/// Reads state and start time of `pid`; `None` when there is no such process.
pub(crate) fn proc_stat(pid: i32) -> Option<ProcStat> {
    if pid <= 0 {
        return None;
    }
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&text)
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may itself contain spaces and
/// parentheses, so fields are counted from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let rest = &text[text.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); ppid is field 4, starttime field 22.
    let state = fields.first()?.chars().next()?;
    let ppid = fields.get(4 - 3)?.parse().ok()?;
    let start_time = fields.get(22 - 3)?.parse().ok()?;
    Some(ProcStat {
        state,
        ppid,
        start_time,
    })
}

/// See [`crate::is_alive`].
pub(crate) fn is_alive(pid: i32, start_time: u64) -> bool {
    match proc_stat(pid) {
        Some(stat) if stat.start_time == start_time => {
            if stat.is_zombie() {
                try_reap(pid);
                false
            } else {
                true
            }
        }
        _ => false,
    }
}

/// `None` while the process runs; once it is gone, how it ended (reaping it if it is ours).
///
/// A multi-threaded process (QEMU) shows its leader as a zombie while its other threads are
/// still exiting, and cannot be reaped yet; for our own child that counts as still running,
/// so the caller polls again and gets the real exit status.
pub(crate) fn exit_status_if_gone(pid: i32, start_time: u64) -> Option<String> {
    match proc_stat(pid) {
        Some(stat) if stat.start_time == start_time && !stat.is_zombie() => None,
        Some(stat) if stat.start_time == start_time => match try_reap(pid) {
            Some(status) => Some(describe_exit(Some(status))),
            None if stat.is_our_child() => None,
            None => Some(describe_exit(None)),
        },
        _ => Some(describe_exit(None)),
    }
}

/// Reaps `pid` if it is an exited child of ours; returns how it ended. Not our child (adopted
/// after a daemon restart): `None`, and its own parent reaps it.
pub(crate) fn try_reap(pid: i32) -> Option<WaitStatus> {
    match waitpid(Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) | Err(_) => None,
        Ok(status) => Some(status),
    }
}

/// Human-readable form of how a process ended, for start-up errors.
pub(crate) fn describe_exit(status: Option<WaitStatus>) -> String {
    match status {
        Some(WaitStatus::Exited(_, code)) => format!("exit status {code}"),
        Some(WaitStatus::Signaled(_, sig, _)) => format!("killed by {sig}"),
        Some(other) => format!("{other:?}"),
        None => "exit status unknown".to_string(),
    }
}

/// Sends `signal` to the process identified by (pid, start time). `Ok(false)`: it is already gone.
pub(crate) fn signal(pid: i32, start_time: u64, sig: libc::c_int) -> Result<bool, ProcessError> {
    let name = signal_name(sig);
    let fail = |source| ProcessError::Signal {
        pid,
        signal: name,
        source,
    };
    match pidfd_open(pid) {
        Ok(fd) => {
            // The pidfd now pins one process; if /proc still shows our start time, that process
            // is ours, and signals through the fd cannot reach a successor with a recycled pid.
            if !is_alive(pid, start_time) {
                return Ok(false);
            }
            match pidfd_send_signal(&fd, sig) {
                Ok(()) => Ok(true),
                Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
                Err(e) => Err(fail(e)),
            }
        }
        Err(e) if e.raw_os_error() == Some(libc::ESRCH) => Ok(false),
        Err(e) if e.raw_os_error() == Some(libc::ENOSYS) => {
            // Kernels before 5.3: no pidfd; check and kill, leaving a tiny reuse window.
            if !is_alive(pid, start_time) {
                return Ok(false);
            }
            // SAFETY: kill(2) with a plain pid and signal number has no memory effects.
            let rc = unsafe { libc::kill(pid, sig) };
            if rc == 0 {
                return Ok(true);
            }
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ESRCH) {
                Ok(false)
            } else {
                Err(fail(e))
            }
        }
        Err(e) => Err(fail(e)),
    }
}

fn signal_name(sig: libc::c_int) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        _ => "a signal",
    }
}

fn pidfd_open(pid: i32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new fd or -1; no pointers.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(fd).map_err(|_| io::Error::other("pidfd out of range"))?;
    // SAFETY: the kernel just returned this fd to us and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_send_signal(fd: &OwnedFd, sig: libc::c_int) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: a valid pidfd, a signal number, a null siginfo (allowed: the kernel fills in a
    // default as for kill(2)) and zero flags.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        )
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Polls until the process is gone or `timeout` passes; true when gone. Gone means reaped
/// for our own child (no zombie left behind), and exited for anyone else's.
pub(crate) async fn wait_gone(pid: i32, start_time: u64, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if exit_status_if_gone(pid, start_time).is_some() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// How long the kernel gets to tear a SIGKILLed VMM down (guest memory can be large).
pub(crate) const KILL_WAIT: Duration = Duration::from_secs(20);

/// Outcome of [`terminate`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ended {
    /// It had exited by itself within the grace period (or was already gone).
    ByItself,
    /// It was killed.
    Killed,
    /// Still there after SIGKILL and [`KILL_WAIT`].
    Stuck,
}

/// Waits up to `grace` for the process to exit, then SIGKILLs it and waits until it is gone.
pub(crate) async fn terminate(
    pid: i32,
    start_time: u64,
    grace: Duration,
) -> Result<Ended, ProcessError> {
    if wait_gone(pid, start_time, grace).await {
        return Ok(Ended::ByItself);
    }
    if !signal(pid, start_time, libc::SIGKILL)? {
        return Ok(Ended::ByItself);
    }
    if wait_gone(pid, start_time, KILL_WAIT).await {
        Ok(Ended::Killed)
    } else {
        Ok(Ended::Stuck)
    }
}

/// The process that `pid_file` names, if it still runs and its command line names `marker` (a
/// path only this VM's VMM is given): a VMM whose starter died before it could record it. The
/// pid alone could be anyone's by now; the marker makes it ours.
pub(crate) fn leftover(pid_file: &Path, marker: &Path) -> Option<Spawned> {
    use std::os::unix::ffi::OsStrExt;
    let pid: i32 = std::fs::read_to_string(pid_file)
        .ok()?
        .trim()
        .parse()
        .ok()?;
    let stat = proc_stat(pid)?;
    if stat.is_zombie() {
        try_reap(pid);
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let marker = marker.as_os_str().as_bytes();
    let named = !marker.is_empty() && cmdline.windows(marker.len()).any(|w| w == marker);
    named.then_some(Spawned {
        pid,
        start_time: stat.start_time,
    })
}

/// Formats the tails of the given logs for an error message (empty logs are left out).
pub(crate) fn format_logs(logs: &[(&str, &Path)]) -> String {
    let mut out = String::new();
    for (label, path) in logs {
        let t = banger_config::logtail::tail(path, 20);
        if !t.trim().is_empty() {
            out.push_str(&format!(
                "\n--- {label} ({}), last lines ---\n{t}",
                path.display()
            ));
        }
    }
    out
}

/// Removes a stale file (socket, pid file); a missing file is fine.
pub(crate) fn remove_stale(path: &Path) -> io::Result<()> {
    match fs_err::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testkit::ProcessGuard;

    #[test]
    fn parse_stat_counts_fields_after_the_last_paren() {
        // A command name with spaces and parens must not shift the fields.
        let line = "4242 (qemu (x) y) S 1 4242 4242 0 -1 4194560 1 0 0 0 0 0 0 0 20 0 3 0 \
                    987654 1000 100 18446744073709551615";
        assert_eq!(
            parse_stat(line),
            Some(ProcStat {
                state: 'S',
                ppid: 1,
                start_time: 987654
            })
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S 1 2"), None);
    }

    #[test]
    fn own_process_is_alive_only_with_its_start_time() {
        let me = std::process::id() as i32;
        let stat = proc_stat(me).expect("own stat");
        assert!(is_alive(me, stat.start_time));
        assert!(
            !is_alive(me, stat.start_time + 1),
            "a different start time is another process"
        );
        assert!(!is_alive(0, stat.start_time));
    }

    fn sleep_spec(dir: &Path) -> SpawnSpec {
        SpawnSpec {
            program: "sleep".into(),
            args: vec!["300".into()],
            log: dir.join("out.log"),
            log_mode: LogMode::Truncate,
            pid_file: dir.join("vmm.pid"),
            cwd: None,
        }
    }

    #[tokio::test]
    async fn spawned_process_runs_in_its_own_session_and_is_killed_and_reaped() {
        let dir = tempfile::tempdir().unwrap();
        let spawned = spawn_detached(&sleep_spec(dir.path())).unwrap();
        let _guard = ProcessGuard::new(spawned.pid, spawned.start_time);

        assert!(is_alive(spawned.pid, spawned.start_time));
        let pid_file = std::fs::read_to_string(dir.path().join("vmm.pid")).unwrap();
        assert_eq!(pid_file, format!("{}\n", spawned.pid));
        // Own session: its session id is its pid, and stdin is /dev/null.
        let sid = nix::unistd::getsid(Some(Pid::from_raw(spawned.pid))).unwrap();
        assert_eq!(sid.as_raw(), spawned.pid);
        let stdin = std::fs::read_link(format!("/proc/{}/fd/0", spawned.pid)).unwrap();
        assert_eq!(stdin, Path::new("/dev/null"));

        let ended = terminate(spawned.pid, spawned.start_time, Duration::from_millis(100))
            .await
            .unwrap();
        assert_eq!(ended, Ended::Killed);
        // Reaped, not a zombie: the stat file is gone.
        assert!(proc_stat(spawned.pid).is_none(), "child was not reaped");
    }

    #[tokio::test]
    async fn an_appended_log_is_held_with_o_append_and_a_truncated_one_without() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sleep_spec(dir.path());
        for (mode, append) in [(LogMode::Append, true), (LogMode::Truncate, false)] {
            spec.log_mode = mode;
            let spawned = spawn_detached(&spec).unwrap();
            let _guard = ProcessGuard::new(spawned.pid, spawned.start_time);
            // Firecracker's console log: the daemon may truncate it under the running VMM.
            assert_eq!(
                crate::testkit::holds_open_for_append(spawned.pid, &spec.log),
                append,
                "{mode:?}"
            );
            terminate(spawned.pid, spawned.start_time, Duration::ZERO)
                .await
                .unwrap();
        }
    }

    #[tokio::test]
    async fn process_that_exits_by_itself_within_grace_is_not_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sleep_spec(dir.path());
        spec.args = vec!["0.2".into()];
        let spawned = spawn_detached(&spec).unwrap();
        let _guard = ProcessGuard::new(spawned.pid, spawned.start_time);
        let ended = terminate(spawned.pid, spawned.start_time, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(ended, Ended::ByItself);
        assert!(proc_stat(spawned.pid).is_none(), "child was not reaped");
    }

    #[tokio::test]
    async fn adopted_process_that_is_not_our_child_is_killed_and_watched_via_proc() {
        // `sh` starts sleep in the background and exits: sleep is reparented away from us,
        // exactly like a VMM after a daemon restart.
        let out = Command::new("sh")
            .args(["-c", "sleep 300 </dev/null >/dev/null 2>&1 & echo $!"])
            .output()
            .unwrap();
        let pid: i32 = String::from_utf8(out.stdout)
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let start = proc_stat(pid).unwrap().start_time;
        let _guard = ProcessGuard::new(pid, start);
        assert!(try_reap(pid).is_none(), "not our child");
        assert!(is_alive(pid, start));

        let ended = terminate(pid, start, Duration::from_millis(50))
            .await
            .unwrap();
        assert_eq!(ended, Ended::Killed);
        assert!(!is_alive(pid, start));
    }

    #[test]
    fn signal_to_a_gone_process_reports_gone() {
        let me = std::process::id() as i32;
        let start = proc_stat(me).unwrap().start_time;
        // Same pid, wrong start time: must not be signalled.
        assert!(!signal(me, start + 1, libc::SIGKILL).unwrap());
        assert!(!signal(i32::MAX, 1, libc::SIGKILL).unwrap());
    }

    #[test]
    fn spawn_of_a_missing_program_names_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = sleep_spec(dir.path());
        spec.program = "/nonexistent/vmm-binary".into();
        let err = spawn_detached(&spec).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmm-binary"), "{err}");
    }

    #[tokio::test]
    async fn a_leftover_is_found_by_its_pid_file_only_if_it_names_the_marker() {
        let dir = tempfile::tempdir().unwrap();
        let marker = dir.path().join("qmp.sock");
        let mut spec = sleep_spec(dir.path());
        spec.program = "sh".into();
        // The shell stays (no `exec`): its command line, with the marker as `$0`, is what is
        // read. An `exec sleep` could replace it before the check, and the marker with it.
        spec.args = vec![
            "-c".into(),
            "while :; do sleep 1; done".into(),
            marker.clone().into_os_string(),
        ];
        let spawned = spawn_detached(&spec).unwrap();
        let _guard = ProcessGuard::new(spawned.pid, spawned.start_time);
        let pid_file = dir.path().join("vmm.pid");
        assert_eq!(leftover(&pid_file, &marker), Some(spawned));
        assert_eq!(leftover(&pid_file, &dir.path().join("fc.sock")), None);
        assert_eq!(leftover(&dir.path().join("missing.pid"), &marker), None);
        terminate(spawned.pid, spawned.start_time, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(leftover(&pid_file, &marker), None, "gone is not left over");
    }
}
