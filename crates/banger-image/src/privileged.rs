//! The one narrow path for host commands that need root during image work.
//!
//! debootstrap, chroot, mkfs of a root-owned tree and removing that tree are each run as a named
//! operation through the [`Privileged`] trait. [`HostPrivileged`] runs them directly when the process
//! is already root and through `sudo -n` otherwise (never prompting: a daemon has no terminal). Child
//! output is streamed line by line to [`Progress::log`]; a failure carries the operation name, the exit
//! status and the last lines of output. [`RecordingPrivileged`] is the fake used to test the logic
//! around these commands without root.

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
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWriteExt, BufReader};

/// How many trailing output lines a failure keeps.
pub const TAIL_LINES: usize = 20;
/// Cap on captured stdout; the full stream still goes to `Progress::log`.
const STDOUT_CAP: usize = 1 << 20;

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
    /// Runs `cmd` as root, streaming its output lines to `progress.log`.
    fn run<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>>;

    /// The uid and gid that files produced for the caller must belong to.
    fn file_owner(&self) -> (u32, u32);
}

/// Runs commands on this host: directly as root, or via `sudo -n` as a user.
#[derive(Debug, Clone)]
pub struct HostPrivileged {
    sudo: Option<PathBuf>,
    owner: (u32, u32),
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
        })
    }

    pub fn uses_sudo(&self) -> bool {
        self.sudo.is_some()
    }

    fn command(&self, cmd: &PrivCommand) -> tokio::process::Command {
        let mut c = match &self.sudo {
            None => {
                let mut c = tokio::process::Command::new(&cmd.program);
                c.args(&cmd.args);
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
                c.arg(&cmd.program).args(&cmd.args);
                c
            }
        };
        c.stdin(if cmd.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // A dropped build future must not leave debootstrap running unsupervised.
        .kill_on_drop(true);
        c
    }

    async fn run_inner(
        &self,
        cmd: &PrivCommand,
        progress: &dyn Progress,
    ) -> Result<PrivOutput, PrivError> {
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
                program: self.sudo.clone().unwrap_or_else(|| cmd.program.clone()),
                source,
            })?;
        let tail = Mutex::new(VecDeque::with_capacity(TAIL_LINES));
        let mut stdout = String::new();

        let feed = async {
            if let (Some(mut pipe), Some(data)) = (child.stdin.take(), cmd.stdin.as_ref()) {
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
        let (fed, out_res, err_res) = futures_util::future::join3(
            feed,
            pump(out_pipe, &tail, progress, Some(&mut stdout)),
            pump(err_pipe, &tail, progress, None),
        )
        .await;
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
    fn run<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
        Box::pin(self.run_inner(cmd, progress))
    }

    fn file_owner(&self) -> (u32, u32) {
        self.owner
    }
}

type Handler = dyn Fn(&PrivCommand) -> Result<PrivOutput, PrivError> + Send + Sync;

/// A fake that records every command and answers through a handler (success with empty output by
/// default). Used to test build orchestration without root or network.
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
    fn run<'a>(
        &'a self,
        cmd: &'a PrivCommand,
        progress: &'a dyn Progress,
    ) -> BoxFuture<'a, Result<PrivOutput, PrivError>> {
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
    fn sudo_wraps_program_and_environment() {
        let host = HostPrivileged {
            sudo: Some("/usr/bin/sudo".into()),
            owner: (1000, 1000),
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
        assert_eq!(
            args,
            ["-n", "--", "env", "LC_ALL=C", "/usr/sbin/chroot", "/tree"]
        );
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

    #[test]
    fn display_quotes_arguments_with_spaces() {
        let cmd = PrivCommand::new("x", "/bin/sh").args(["-c", "echo it's"]);
        assert_eq!(cmd.to_string(), r"/bin/sh -c 'echo it'\''s'");
    }
}
