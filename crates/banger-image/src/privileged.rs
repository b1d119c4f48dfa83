//! The one narrow path for host commands that need root during image work.
//!
//! debootstrap, chroot, mkfs of a root-owned tree and removing that tree are each run as a named
//! operation through the [`Privileged`] trait. [`HostPrivileged`] runs them directly when the process
//! is already root and through `sudo -n` otherwise (never prompting: a daemon has no terminal). Child
//! output is streamed line by line to [`Progress::log`]; a failure carries the operation name, the exit
//! status and the last lines of output. [`RecordingPrivileged`] is the fake used to test the logic
//! around these commands without root.
//!
//! # No command outlives its caller
//!
//! debootstrap forks dpkg, chroot, wget and more, and under `sudo` they all run as root, so the
//! caller (the daemon, a user) may not even be allowed to signal them. Every command therefore
//! runs under a small root-side guard, [`GUARD`], a POSIX shell script started (through sudo when
//! needed) in place of the command:
//!
//! - it starts the command with `setsid`, in a process group of its own that holds everything the
//!   command forks (unless something makes a group of its own on purpose);
//! - on SIGTERM (sent by [`Privileged::run_until`] on cancellation, to the guard or to sudo, which
//!   passes it on) it kills that group with SIGKILL and waits for the command, so a cancelled run
//!   returns only once the command is gone;
//! - a watcher process checks five times a second that the caller is still an ancestor of the
//!   guard; when the caller died (even by SIGKILL, which nothing can catch) or killed the guard or
//!   sudo (a dropped future: `kill_on_drop`), it kills the group. `PR_SET_PDEATHSIG` would not do:
//!   it is cleared when sudo (set-user-ID) starts, it would stop only the direct child, and it
//!   follows the thread that forked rather than the process;
//! - when the command exits, whatever is left of its group is killed, so a background process a
//!   step started cannot keep its output pipes (and the caller) waiting.
//!
//! A process that leaves the group on purpose (a daemon calling `setsid` itself) escapes the guard;
//! a build's tree is still removed after it (mounts first, see [`crate::workdir`]).

use crate::hosttools::{require_tool, MissingTool};
use crate::progress::Progress;
use banger_hint::Hint;
use futures_util::future::BoxFuture;
use std::borrow::Cow;
use std::collections::VecDeque;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::Duration;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

/// How many trailing output lines a failure keeps.
pub const TAIL_LINES: usize = 20;
/// Cap on captured stdout; the full stream still goes to `Progress::log`.
const STDOUT_CAP: usize = 1 << 20;
/// How long a cancelled command's guard gets to kill it and exit before the guard (or sudo) is
/// killed outright; its watcher then still kills the command.
const CANCEL_GRACE: Duration = Duration::from_secs(10);
/// The shell every guard runs in (absolute, like every privileged program).
const SH: &str = "/bin/sh";

/// The guard every privileged command runs under (see the module documentation). Arguments: the
/// caller's pid, the absolute paths of `setsid` and `sleep`, then the command and its arguments.
/// The command is started in the background, so its process is never the group leader `setsid`
/// would have to fork from: its pid is its group's id. The trap is set before it starts, so a
/// SIGTERM at any moment kills it; `kill -9 -PGID PID` also covers the instant before `setsid`
/// runs. `kill -9 -PGID` is the form dash accepts (it takes no `--`). `sleep 0.2` falls back to
/// whole seconds where `sleep` only takes those.
pub const GUARD: &str = r#"d=$1 setsid=$2 sleep=$3
shift 3
ours() {
  read -r s </proc/self/stat || return 1
  while :; do
    s=${s##*) }
    set -- $s
    [ "$2" = "$d" ] && return 0
    [ "$2" -gt 1 ] 2>/dev/null || return 1
    read -r s <"/proc/$2/stat" 2>/dev/null || return 1
  done
}
c= stop=
trap 'stop=1; [ -z "$c" ] || kill -9 -"$c" "$c" 2>/dev/null' HUP INT TERM
exec 3<&0
"$setsid" "$@" <&3 3<&- &
c=$!
exec 3<&-
[ -z "$stop" ] || kill -9 -"$c" "$c" 2>/dev/null
(
  trap '' HUP INT TERM PIPE
  while kill -0 "$c" 2>/dev/null; do
    ours || { kill -9 -"$c" "$c" 2>/dev/null; exit 0; }
    "$sleep" 0.2 || "$sleep" 1
  done
) </dev/null >/dev/null 2>&1 &
w=$!
wait "$c"
st=$?
[ -z "$stop" ] || wait "$c"
kill -9 -"$c" "$w" 2>/dev/null
exit "$st"
"#;

/// A host command that needs root, with the name it is reported under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrivCommand {
    /// Short name of the operation, e.g. "debootstrap" or "write /etc/hostname".
    pub op: String,
    /// Absolute path of the program (sudo's secure_path must not decide which binary runs).
    pub program: PathBuf,
    pub args: Vec<OsString>,
    /// Variables set for the command on top of what it inherits (or what sudo keeps).
    pub env: Vec<(String, String)>,
    /// Bytes fed to the command's stdin; stdin is empty when `None`.
    pub stdin: Option<Vec<u8>>,
}

impl PrivCommand {
    pub fn new(op: impl Into<String>, program: impl Into<PathBuf>) -> Self {
        Self {
            op: op.into(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
            stdin: None,
        }
    }

    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    pub fn args<I, S>(mut self, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        self.args
            .extend(args.into_iter().map(|a| a.as_ref().to_owned()));
        self
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    pub fn stdin(mut self, data: impl Into<Vec<u8>>) -> Self {
        self.stdin = Some(data.into());
        self
    }

    /// The arguments as lossy strings, for assertions and logs.
    pub fn arg_strings(&self) -> Vec<String> {
        self.args
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect()
    }
}

impl fmt::Display for PrivCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.program.display())?;
        for a in &self.args {
            let a = a.to_string_lossy();
            if a.contains(char::is_whitespace) {
                write!(f, " '{}'", a.replace('\'', r"'\''"))?;
            } else {
                write!(f, " {a}")?;
            }
        }
        Ok(())
    }
}

/// What a successful privileged command printed on stdout.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PrivOutput {
    pub stdout: String,
}

#[derive(Debug, thiserror::Error)]
pub enum PrivError {
    #[error("could not start privileged operation `{op}` ({program})")]
    Spawn {
        op: String,
        program: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("privileged operation `{op}` failed: {status}{}", render_tail(tail))]
    Failed {
        op: String,
        /// Exit status as printed by the OS ("exit status: 1", "signal: 9 (SIGKILL)").
        status: String,
        /// The last [`TAIL_LINES`] lines of stdout and stderr, interleaved as they arrived.
        tail: Vec<String>,
        via_sudo: bool,
    },
    #[error("privileged operation `{op}`: talking to the child process failed")]
    Io {
        op: String,
        #[source]
        source: std::io::Error,
    },
    /// The caller cancelled: the command and its process group were killed (or never started).
    #[error("privileged operation `{op}` was cancelled")]
    Cancelled { op: String },
}

impl Hint for PrivError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            PrivError::Failed { tail, via_sudo, .. }
                if *via_sudo && tail.iter().any(|l| l.contains("sudo:")) =>
            {
                Some(
                    "banger runs this step with `sudo -n`; allow it without a password in \
                     sudoers, or run as root"
                        .into(),
                )
            }
            _ => None,
        }
    }
}

impl PrivError {
    /// A failure as a fake would report it; `code` becomes "exit status: CODE".
    pub fn failed(op: impl Into<String>, code: i32, tail: &[&str]) -> Self {
        PrivError::Failed {
            op: op.into(),
            status: format!("exit status: {code}"),
            tail: tail.iter().map(|s| (*s).to_owned()).collect(),
            via_sudo: false,
        }
    }

    /// The trailing output lines of a failed command (empty for other errors).
    pub fn tail(&self) -> &[String] {
        match self {
            PrivError::Failed { tail, .. } => tail,
            _ => &[],
        }
    }

    /// True when the command ran out of disk space (ENOSPC shows up in its output).
    pub fn is_disk_full(&self) -> bool {
        match self {
            PrivError::Failed { tail, .. } => tail.iter().any(|l| mentions_enospc(l)),
            PrivError::Spawn { source, .. } | PrivError::Io { source, .. } => {
                source.raw_os_error() == Some(libc::ENOSPC)
            }
            PrivError::Cancelled { .. } => false,
        }
    }
}

pub(crate) fn mentions_enospc(line: &str) -> bool {
    let l = line.to_ascii_lowercase();
    l.contains("no space left on device") || l.contains("enospc")
}

fn render_tail(tail: &[String]) -> String {
    let mut s = String::new();
    if !tail.is_empty() {
        s.push_str("\nlast output lines:");
        for l in tail {
            s.push_str("\n  ");
            s.push_str(l);
        }
    }
    s
}

/// Runs host commands that need root. The trait is the test seam: the build logic is exercised
/// against [`RecordingPrivileged`].
pub trait Privileged: Send + Sync {
    /// Runs `cmd` as root, streaming its output lines to `progress.log`, until it ends or
    /// `cancel` fires. A cancelled command is killed with everything it started, and the result
    /// ([`PrivError::Cancelled`]) comes only once it is gone, so the caller may clean up after
    /// it at once; once `cancel` has fired, no command starts.
    fn run_until<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>>;

    /// Runs `cmd` as root to its end, streaming its output lines to `progress.log`. Dropping the
    /// future kills the command's guard; the guard's watcher then kills the command's process
    /// group within a fraction of a second, without waiting for it.
    fn run<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
        Box::pin(async move {
            let never = CancellationToken::new();
            self.run_until(cmd, progress, &never).await
        })
    }

    /// The uid and gid that files produced for the caller must belong to.
    fn file_owner(&self) -> (u32, u32);
}

/// A runner whose commands all stop when its token fires, on top of another: a build's steps
/// run through one, and its clean-up through the plain runner underneath, which still works
/// after the cancellation.
pub struct Cancellable<'p> {
    inner: &'p dyn Privileged,
    cancel: CancellationToken,
}

impl<'p> Cancellable<'p> {
    pub fn new(inner: &'p dyn Privileged, cancel: CancellationToken) -> Self {
        Self { inner, cancel }
    }
}

impl Privileged for Cancellable<'_> {
    fn run_until<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
        Box::pin(async move {
            // Fires with our token, or when the caller's does.
            let either = self.cancel.child_token();
            let mut run = self.inner.run_until(cmd, progress, &either);
            tokio::select! {
                r = &mut run => r,
                () = cancel.cancelled() => {
                    either.cancel();
                    run.await
                }
            }
        })
    }

    fn file_owner(&self) -> (u32, u32) {
        self.inner.file_owner()
    }
}

/// Runs commands on this host: directly as root, or via `sudo -n` as a user, each under
/// [`GUARD`].
#[derive(Debug, Clone)]
pub struct HostPrivileged {
    sudo: Option<PathBuf>,
    owner: (u32, u32),
    setsid: PathBuf,
    sleep: PathBuf,
}

impl HostPrivileged {
    /// Picks direct execution when the effective uid is 0, `sudo -n` otherwise.
    pub fn detect() -> Result<Self, MissingTool> {
        // SAFETY: geteuid and getegid cannot fail and have no side effects.
        let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
        let sudo = if uid == 0 {
            None
        } else {
            Some(require_tool("sudo", "sudo")?)
        };
        Ok(Self {
            sudo,
            owner: (uid, gid),
            setsid: require_tool("setsid", "util-linux")?,
            sleep: require_tool("sleep", "coreutils")?,
        })
    }

    pub fn uses_sudo(&self) -> bool {
        self.sudo.is_some()
    }

    fn command(&self, cmd: &PrivCommand) -> tokio::process::Command {
        let mut c = match &self.sudo {
            None => {
                let mut c = tokio::process::Command::new(SH);
                c.envs(cmd.env.iter().map(|(k, v)| (k, v)));
                c
            }
            Some(sudo) => {
                // sudo resets the environment, so variables travel as `env K=V` arguments.
                let mut c = tokio::process::Command::new(sudo);
                c.arg("-n").arg("--");
                if !cmd.env.is_empty() {
                    c.arg("env");
                    c.args(cmd.env.iter().map(|(k, v)| format!("{k}={v}")));
                }
                c.arg(SH);
                c
            }
        };
        c.arg("-c")
            .arg(GUARD)
            .arg("banger-guard")
            .arg(std::process::id().to_string())
            .arg(&self.setsid)
            .arg(&self.sleep)
            .arg(&cmd.program)
            .args(&cmd.args);
        c.stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A dropped future kills the guard (or sudo); the guard's watcher then kills the command.
        .kill_on_drop(true);
        c
    }

    async fn run_inner(
        &self,
        cmd: &PrivCommand,
        progress: &dyn Progress,
        cancel: &CancellationToken,
    ) -> Result<PrivOutput, PrivError> {
        let cancelled = || PrivError::Cancelled { op: cmd.op.clone() };
        if cancel.is_cancelled() {
            return Err(cancelled());
        }
        let spawn_err = |source| PrivError::Spawn {
            op: cmd.op.clone(),
            program: cmd.program.clone(),
            source,
        };
        // Under the guard a missing program would only be an exit status; name it plainly.
        tokio::fs::metadata(&cmd.program).await.map_err(spawn_err)?;
        tracing::debug!(op = %cmd.op, command = %cmd, sudo = self.uses_sudo(), "privileged operation");
        progress.log(&format!("+ {cmd}"));
        let io_err = |source| PrivError::Io {
            op: cmd.op.clone(),
            source,
        };
        let mut child = self
            .command(cmd)
            .spawn()
            .map_err(|source| PrivError::Spawn {
                op: cmd.op.clone(),
                program: self.sudo.clone().unwrap_or_else(|| SH.into()),
                source,
            })?;
        let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
        let mut stdout = String::new();

        let stdin = child.stdin.take();
        let feed = async {
            if let (Some(mut pipe), Some(data)) = (stdin, cmd.stdin.as_ref()) {
                // A child that exits without reading all of stdin is judged by its exit status.
                if let Err(e) = pipe.write_all(data).await {
                    if e.kind() != std::io::ErrorKind::BrokenPipe {
                        return Err(e);
                    }
                }
            }
            Ok(())
        };
        let out_pipe = child.stdout.take();
        let err_pipe = child.stderr.take();
        // The pipes close when the guard and the command's whole group are gone.
        let io = futures_util::future::join3(
            feed,
            pump(out_pipe, &tail, progress, Some(&mut stdout)),
            pump(err_pipe, &tail, progress, None),
        );
        let finished = tokio::select! {
            biased;
            () = cancel.cancelled() => None,
            r = io => Some(r),
        };
        let Some((fed, out_res, err_res)) = finished else {
            stop(&mut child, &cmd.op).await;
            return Err(cancelled());
        };
        fed.map_err(io_err)?;
        out_res.map_err(io_err)?;
        err_res.map_err(io_err)?;
        let status = child.wait().await.map_err(io_err)?;
        if status.success() {
            Ok(PrivOutput { stdout })
        } else {
            let tail = tail.into_inner().unwrap_or_else(|p| p.into_inner());
            Err(PrivError::Failed {
                op: cmd.op.clone(),
                status: status.to_string(),
                tail: tail.into(),
                via_sudo: self.uses_sudo(),
            })
        }
    }
}

/// Asks the guard to kill the command and waits for it to finish doing so; kills the guard (or
/// sudo) if it takes too long, leaving the rest to the guard's watcher.
async fn stop(child: &mut tokio::process::Child, op: &str) {
    if let Some(pid) = child.id().and_then(|p| libc::pid_t::try_from(p).ok()) {
        // SAFETY: kill(2) has no memory effects; `pid` is our unreaped child, so it cannot
        // belong to another process. sudo passes SIGTERM on to the guard.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    if tokio::time::timeout(CANCEL_GRACE, child.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            op,
            "a cancelled privileged command did not stop in time; killing it"
        );
        let _ = child.start_kill();
        let _ = child.wait().await;
    }
}

async fn pump<R: AsyncRead + Unpin>(
    pipe: Option<R>,
    tail: &Mutex<VecDeque<String>>,
    progress: &dyn Progress,
    mut capture: Option<&mut String>,
) -> std::io::Result<()> {
    let Some(pipe) = pipe else { return Ok(()) };
    let mut reader = BufReader::new(pipe);
    let mut buf = Vec::new();
    loop {
        buf.clear();
        if reader.read_until(b'\n', &mut buf).await? == 0 {
            return Ok(());
        }
        let line = String::from_utf8_lossy(&buf);
        let line = line.trim_end_matches(['\n', '\r']);
        if let Some(c) = capture.as_deref_mut() {
            if c.len() + line.len() < STDOUT_CAP {
                c.push_str(line);
                c.push('\n');
            }
        }
        progress.log(line);
        let mut t = tail.lock().unwrap_or_else(|p| p.into_inner());
        if t.len() == TAIL_LINES {
            t.pop_front();
        }
        t.push_back(line.to_owned());
    }
}

impl Privileged for HostPrivileged {
    fn run_until<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
        Box::pin(self.run_inner(cmd, progress, cancel))
    }

    fn file_owner(&self) -> (u32, u32) {
        self.owner
    }
}

type Handler = dyn Fn(&PrivCommand) -> Result<PrivOutput, PrivError> + Send + Sync;

/// A fake that records every command and answers through a handler (success with empty output by
/// default). Used to test build orchestration without root or network. Once the caller's token
/// has fired, commands are refused as cancelled and not recorded, like the real runner's.
pub struct RecordingPrivileged {
    calls: Mutex<Vec<PrivCommand>>,
    handler: Box<Handler>,
    owner: (u32, u32),
}

impl Default for RecordingPrivileged {
    fn default() -> Self {
        Self::new(|_| Ok(PrivOutput::default()))
    }
}

impl RecordingPrivileged {
    pub fn new(
        handler: impl Fn(&PrivCommand) -> Result<PrivOutput, PrivError> + Send + Sync + 'static,
    ) -> Self {
        Self {
            calls: Mutex::new(Vec::new()),
            handler: Box::new(handler),
            owner: (0, 0),
        }
    }

    /// Pretends to run for a non-root user, so outputs must be handed to `uid:gid`.
    pub fn with_owner(mut self, uid: u32, gid: u32) -> Self {
        self.owner = (uid, gid);
        self
    }

    pub fn calls(&self) -> Vec<PrivCommand> {
        self.calls.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The operation names, in the order they ran.
    pub fn ops(&self) -> Vec<String> {
        self.calls().into_iter().map(|c| c.op).collect()
    }
}

impl Privileged for RecordingPrivileged {
    fn run_until<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
        cancel: &'a CancellationToken,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
        if cancel.is_cancelled() {
            let op = cmd.op.clone();
            return Box::pin(async move { Err(PrivError::Cancelled { op }) });
        }
        self.calls
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(cmd.clone());
        progress.log(&format!("+ {cmd}"));
        let result = (self.handler)(cmd);
        Box::pin(async move { result })
    }

    fn file_owner(&self) -> (u32, u32) {
        self.owner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::progress::RecordingProgress;

    fn sh(op: &str, script: &str) -> PrivCommand {
        PrivCommand::new(op, "/bin/sh").arg("-c").arg(script)
    }

    #[tokio::test]
    async fn runs_directly_as_root_and_streams_both_output_streams() {
        let host = HostPrivileged::detect().unwrap();
        assert!(!host.uses_sudo(), "these tests run as root");
        let rec = RecordingProgress::new();
        let out = host
            .run(&sh("greet", "echo out1; echo err1 >&2; echo out2"), &rec)
            .await
            .unwrap();
        assert_eq!(out.stdout, "out1\nout2\n");
        let logs = rec.logs();
        for l in ["out1", "err1", "out2"] {
            assert!(logs.iter().any(|x| x == l), "{l} missing from {logs:?}");
        }
        assert_eq!(host.file_owner(), (0, 0));
    }

    #[tokio::test]
    async fn feeds_stdin_and_passes_environment() {
        let host = HostPrivileged::detect().unwrap();
        let cmd = sh("cat", "printf '%s:' \"$GREETING\"; cat")
            .env("GREETING", "hi")
            .stdin(b"from stdin".to_vec());
        let out = host.run(&cmd, &RecordingProgress::new()).await.unwrap();
        assert_eq!(out.stdout, "hi:from stdin\n");
    }

    #[tokio::test]
    async fn failure_names_operation_status_and_last_twenty_lines() {
        let host = HostPrivileged::detect().unwrap();
        let err = host
            .run(
                &sh(
                    "count-and-fail",
                    "for i in $(seq 1 30); do echo line$i; done; exit 3",
                ),
                &RecordingProgress::new(),
            )
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("`count-and-fail`"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert_eq!(err.tail().len(), TAIL_LINES);
        assert_eq!(err.tail().first().map(String::as_str), Some("line11"));
        assert!(msg.contains("line30") && !msg.contains("line10\n"), "{msg}");
    }

    #[tokio::test]
    async fn missing_program_is_a_spawn_error_naming_it() {
        let host = HostPrivileged::detect().unwrap();
        let cmd = PrivCommand::new("nothing", "/nonexistent/banger-tool");
        let err = host.run(&cmd, &RecordingProgress::new()).await.unwrap_err();
        assert!(matches!(err, PrivError::Spawn { .. }));
        assert!(
            err.to_string().contains("/nonexistent/banger-tool"),
            "{err}"
        );
    }

    #[test]
    fn sudo_wraps_the_guard_program_and_environment() {
        let host = HostPrivileged {
            sudo: Some("/usr/bin/sudo".into()),
            owner: (1000, 1000),
            setsid: "/usr/bin/setsid".into(),
            sleep: "/usr/bin/sleep".into(),
        };
        let cmd = PrivCommand::new("chroot", "/usr/sbin/chroot")
            .arg("/tree")
            .env("LC_ALL", "C");
        let c = host.command(&cmd);
        let std = c.as_std();
        assert_eq!(std.get_program(), "/usr/bin/sudo");
        let args: Vec<_> = std
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        let pid = std::process::id().to_string();
        assert_eq!(
            args,
            [
                "-n",
                "--",
                "env",
                "LC_ALL=C",
                SH,
                "-c",
                GUARD,
                "banger-guard",
                &pid,
                "/usr/bin/setsid",
                "/usr/bin/sleep",
                "/usr/sbin/chroot",
                "/tree"
            ]
        );
        // As root, the guard is started directly, with the environment set on it.
        let root = HostPrivileged { sudo: None, ..host };
        let c = root.command(&cmd);
        assert_eq!(c.as_std().get_program(), SH);
        assert_eq!(c.as_std().get_args().nth(6).unwrap(), "/usr/sbin/chroot");
        assert!(c
            .as_std()
            .get_envs()
            .any(|(k, v)| k == "LC_ALL" && v == Some(OsStr::new("C"))));
    }

    #[test]
    fn sudo_password_failure_gets_a_hint_and_enospc_is_detected() {
        let err = PrivError::Failed {
            op: "debootstrap".into(),
            status: "exit status: 1".into(),
            tail: vec!["sudo: a password is required".into()],
            via_sudo: true,
        };
        assert!(err
            .hint()
            .unwrap()
            .starts_with("banger runs this step with `sudo -n`"));
        assert!(!err.to_string().contains("hint"), "{err}");
        assert!(!err.is_disk_full());
        let full = PrivError::failed(
            "mkfs",
            1,
            &["cp: error writing 'x': No space left on device"],
        );
        assert!(full.is_disk_full());
    }

    #[tokio::test]
    async fn recording_fake_records_and_answers() {
        let fake = RecordingPrivileged::new(|c| {
            if c.op == "boom" {
                Err(PrivError::failed("boom", 2, &["bad"]))
            } else {
                Ok(PrivOutput {
                    stdout: "ok\n".into(),
                })
            }
        })
        .with_owner(1000, 1001);
        let p = RecordingProgress::new();
        assert_eq!(fake.run(&sh("a", "x"), &p).await.unwrap().stdout, "ok\n");
        assert!(fake.run(&sh("boom", "x"), &p).await.is_err());
        assert_eq!(fake.ops(), ["a", "boom"]);
        assert_eq!(fake.file_owner(), (1000, 1001));
    }

    #[tokio::test]
    async fn the_cancellable_runner_refuses_work_after_its_token_fires_but_not_the_one_beneath() {
        let fake = RecordingPrivileged::default();
        let token = CancellationToken::new();
        let steps = Cancellable::new(&fake, token.clone());
        let p = RecordingProgress::new();
        steps.run(&sh("step one", "x"), &p).await.unwrap();
        token.cancel();
        let err = steps.run(&sh("step two", "x"), &p).await.unwrap_err();
        assert!(matches!(err, PrivError::Cancelled { .. }), "{err}");
        assert_eq!(
            err.to_string(),
            "privileged operation `step two` was cancelled"
        );
        fake.run(&sh("clean up", "x"), &p).await.unwrap();
        assert_eq!(fake.ops(), ["step one", "clean up"]);
    }

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let cmd = PrivCommand::new("x", "/bin/sh").args(["-c", "echo it's"]);
        assert_eq!(cmd.to_string(), r"/bin/sh -c 'echo it'\''s'");
    }

    /// Tests with real processes: a stand-in for debootstrap that forks a grandchild and waits.
    mod processes {
        use super::*;
        use crate::testproc::{alive, gone_within, pids_in, Reaper};
        use std::os::unix::fs::PermissionsExt;
        use std::path::Path;
        use std::time::Instant;

        /// Records its own pid and its grandchild's in "$1", says so, then waits forever.
        const STAND_IN: &str = "#!/bin/sh\nsleep 1000 &\necho $$ $! > \"$1.new\"\nmv \"$1.new\" \"$1\"\necho started\nwait\n";

        fn stand_in(dir: &Path) -> (PrivCommand, PathBuf) {
            let script = dir.join("debootstrap");
            std::fs::write(&script, STAND_IN).unwrap();
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
            let pids = dir.join("pids");
            (PrivCommand::new("debootstrap", script).arg(&pids), pids)
        }

        #[tokio::test]
        async fn cancelling_kills_the_command_and_its_children_before_returning() {
            let dir = tempfile::tempdir().unwrap();
            let (cmd, file) = stand_in(dir.path());
            let host = HostPrivileged::detect().unwrap();
            let reaper = Reaper::new();
            let token = CancellationToken::new();
            let rec = RecordingProgress::new();
            let run = host.run_until(&cmd, &rec, &token);
            let cancel = async {
                let pids = pids_in(&file).await;
                reaper.add(&pids);
                // Its output streams while it runs.
                while !rec.logs().iter().any(|l| l == "started") {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                assert!(pids.iter().all(|&p| alive(p)));
                token.cancel();
                pids
            };
            let (result, pids) = tokio::join!(run, cancel);
            let [command, grandchild] = pids[..] else {
                panic!("{pids:?}")
            };
            let err = result.unwrap_err();
            assert!(matches!(err, PrivError::Cancelled { .. }), "{err}");
            assert!(
                !alive(command),
                "the command was reaped before the run returned"
            );
            // SIGKILL is sent to the whole group before the run returns; the orphaned
            // grandchild's end only needs a moment.
            gone_within(&[grandchild], Duration::from_secs(2)).await;
            // Nothing starts once cancelled.
            let err = host.run_until(&cmd, &rec, &token).await.unwrap_err();
            assert!(matches!(err, PrivError::Cancelled { .. }), "{err}");
        }

        #[tokio::test]
        async fn dropping_the_run_kills_the_command_and_its_children() {
            let dir = tempfile::tempdir().unwrap();
            let (cmd, file) = stand_in(dir.path());
            let host = HostPrivileged::detect().unwrap();
            let reaper = Reaper::new();
            let rec = RecordingProgress::new();
            let pids = tokio::select! {
                r = host.run(&cmd, &rec) => panic!("the stand-in ended: {r:?}"),
                pids = pids_in(&file) => pids,
            };
            reaper.add(&pids);
            // The run future is gone; the guard's watcher sees that within a fraction of a second.
            gone_within(&pids, Duration::from_secs(3)).await;
        }

        /// Set in the child process that plays a daemon killed mid-build.
        const CALLER: &str = "BANGER_PRIV_TEST_CALLER";

        #[test]
        fn a_killed_caller_takes_its_commands_with_it() {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            if let Some(dir) = std::env::var_os(CALLER) {
                // The caller: runs the stand-in until the parent kills this process.
                let (cmd, _) = stand_in(Path::new(&dir));
                let host = HostPrivileged::detect().unwrap();
                let r = rt.block_on(host.run(&cmd, &crate::progress::NoProgress));
                panic!("the stand-in ended: {r:?}");
            }
            let dir = tempfile::tempdir().unwrap();
            let name = "privileged::tests::processes::a_killed_caller_takes_its_commands_with_it";
            let mut caller = std::process::Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(CALLER, dir.path())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let reaper = Reaper::new();
            reaper.add(&[i32::try_from(caller.id()).unwrap()]);
            rt.block_on(async {
                let pids = pids_in(&dir.path().join("pids")).await;
                reaper.add(&pids);
                caller.kill().unwrap();
                caller.wait().unwrap();
                gone_within(&pids, Duration::from_secs(3)).await;
            });
        }

        #[tokio::test]
        async fn a_background_process_a_command_leaves_is_killed_when_it_ends() {
            let host = HostPrivileged::detect().unwrap();
            let reaper = Reaper::new();
            let started = Instant::now();
            let out = host
                .run(
                    &sh("leave", "sleep 1000 & echo $!"),
                    &RecordingProgress::new(),
                )
                .await
                .unwrap();
            let pid: i32 = out.stdout.trim().parse().unwrap();
            reaper.add(&[pid]);
            assert!(started.elapsed() < Duration::from_secs(10));
            gone_within(&[pid], Duration::from_secs(2)).await;
        }
    }
}
