//! Running commands for `exec` requests: spawning, streaming their output as frames while it is
//! produced, feeding their stdin, delivering signals, and reporting how they ended.
//!
//! Each command runs in its own process group (so a signal or a kill reaches what it started,
//! not just a shell) with four threads: one feeding stdin from a bounded queue, one pump per
//! output pipe, and a waiter that reports `exit` after both pumps are done, so the exit frame
//! always follows the command's last output. A command that leaves a background process
//! holding its pipes open does not keep its `exit` back: once the command itself ended, the
//! pumps stop as soon as the pipes go quiet.
//!
//! A command with a terminal ([`ExecSpec::terminal`]) runs instead as the leader of a new
//! session on a pseudo-terminal ([`crate::guest::pty`]): one pump reads the master (stdout and
//! stderr merged, as a terminal shows them), the feeder writes what the user types to it,
//! signals go to the terminal's foreground process group, and SIGHUP (or the host going away)
//! hangs up the whole session.
//!
//! Commands run as the image's user or the request's (resolved by [`crate::guest::users`]):
//! the child drops to it with setgroups, setgid and setuid just before exec. Without either,
//! they run as the agent does (root).
//!
//! The serve loop owns an [`ExecTable`] per host connection; when the connection ends, every
//! command still running for it is killed (terminal sessions are hung up), since nobody is left
//! to read its output.

use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid};

use crate::guest::pty;
use crate::guest::serve::{report, FrameWriter, ServeConfig};
use crate::guest::users::{self, Identity};
use crate::protocol::{
    Data, GuestMessage, RequestId, WindowSize, MAX_CHUNK, OUTPUT_WINDOW, STDIN_WINDOW,
};

/// How many stdin chunks may wait for a command that is slow to read. Hosts that take acks keep
/// at most [`STDIN_WINDOW`] in flight, so the queue never fills and the serve loop never blocks on
/// it; for older hosts, a full queue blocks the serve loop, which pushes back through the stream.
const STDIN_QUEUE: usize = 2 * STDIN_WINDOW;
/// After the command exited, a pump stops once its pipe stayed quiet this long.
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(50);
/// After the command exited, a pump stops after this long even if background processes keep
/// writing.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);
/// How long an output pump waits for a credit before it looks again whether the command ended.
const CREDIT_WAIT: Duration = Duration::from_millis(250);
/// How often a blocked terminal feeder looks whether its session ended.
const FEEDER_TICK: Duration = Duration::from_millis(250);
/// `TERM` for terminal sessions whose request names none.
pub const DEFAULT_TERM: &str = "xterm-256color";
/// The login shell where the user's passwd entry names none that exists.
const FALLBACK_SHELL: &str = "/bin/sh";

/// What an `exec` request asks for.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    /// The program and its arguments; empty for the user's login shell.
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    /// A pseudo-terminal of this size; `None` runs the command on pipes.
    pub terminal: Option<WindowSize>,
    /// Who to run as, overriding [`ServeConfig::user`].
    pub user: Option<String>,
    /// Hold output back until the host acknowledges it (at most [`OUTPUT_WINDOW`] frames ahead).
    pub output_acks: bool,
}

/// Output frames a command may still send before the host acknowledges some. The command's
/// output pumps take one per frame and wait when none are left: the command then blocks on its
/// full pipe, and only it, while the stream goes on serving everything else.
struct Credits {
    left: Mutex<usize>,
    more: Condvar,
}

impl Credits {
    fn new() -> Arc<Credits> {
        Arc::new(Credits {
            left: Mutex::new(OUTPUT_WINDOW),
            more: Condvar::new(),
        })
    }

    /// Takes one credit, waiting at most `wait` for it; false if none came.
    fn take(&self, wait: Duration) -> bool {
        let left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        let (mut left, _) = self
            .more
            .wait_timeout_while(left, wait, |l| *l == 0)
            .unwrap_or_else(PoisonError::into_inner);
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    /// One frame was acknowledged (or not sent after all). Never more than the window: a host
    /// that acknowledges too much gets no more than it asked for.
    fn give(&self) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        if *left < OUTPUT_WINDOW {
            *left += 1;
        }
        self.more.notify_all();
    }

    /// No more waiting: the connection is gone, so the pumps may run into its end.
    fn release(&self) {
        let mut left = self.left.lock().unwrap_or_else(PoisonError::into_inner);
        *left = usize::MAX;
        self.more.notify_all();
    }
}

/// How the agent reaches a running command.
#[derive(Clone)]
enum Control {
    /// On pipes, in its own process group.
    Pipes { pgid: Pid },
    /// On a terminal, leading its own session. `exited` is the session's "stop forwarding"
    /// flag, shared with its pump and feeder.
    Terminal {
        leader: Pid,
        master: Arc<OwnedFd>,
        exited: Arc<AtomicBool>,
    },
}

impl Control {
    /// Hangs up a terminal session as a closed terminal would: SIGHUP, then SIGCONT (so stopped
    /// jobs see it), to the foreground group and to the session leader's group.
    fn hang_up(leader: Pid, master: &OwnedFd) {
        let mut groups = vec![leader];
        groups.extend(pty::foreground_group(master).filter(|g| *g != leader));
        for group in groups {
            let _ = killpg(group, Signal::SIGHUP);
            let _ = killpg(group, Signal::SIGCONT);
        }
    }
}

struct Running {
    control: Control,
    /// Dropping the sender closes the command's stdin.
    stdin: Option<SyncSender<Vec<u8>>>,
    /// Present when the host acknowledges output.
    credits: Option<Arc<Credits>>,
}

/// The commands running for one host connection, by request id.
#[derive(Default)]
pub(crate) struct ExecTable {
    running: Mutex<HashMap<RequestId, Running>>,
}

impl ExecTable {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<RequestId, Running>> {
        // A panicking pump cannot leave the map half-updated: every change is one insert or
        // remove, so the data behind a poisoned lock is still consistent.
        self.running.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The host's reader took one output frame of the command.
    pub(crate) fn output_ack(&self, id: RequestId) {
        if let Some(credits) = self.lock().get(&id).and_then(|r| r.credits.clone()) {
            credits.give();
        }
    }

    /// Queues `data` for the command's stdin. Unknown ids (the command already ended) are
    /// ignored: the host may not have seen the `exit` yet.
    pub(crate) fn stdin(&self, id: RequestId, data: Vec<u8>) {
        let sender = self.lock().get(&id).and_then(|r| r.stdin.clone());
        if let Some(sender) = sender {
            // Fails only when the command closed its stdin; the data has nowhere to go then.
            let _ = sender.send(data);
        }
    }

    pub(crate) fn close_stdin(&self, id: RequestId) {
        if let Some(r) = self.lock().get_mut(&id) {
            r.stdin = None;
        }
    }

    /// Sends `signal` to the command's process group; for a terminal session, to the
    /// terminal's foreground process group, and SIGHUP hangs the session up.
    pub(crate) fn signal(&self, id: RequestId, signal: i32) -> Result<(), String> {
        let Some(control) = self.lock().get(&id).map(|r| r.control.clone()) else {
            return Ok(());
        };
        let sig = Signal::try_from(signal).map_err(|_| format!("{signal} is not a signal"))?;
        let group = match control {
            Control::Pipes { pgid } => pgid,
            Control::Terminal { leader, master, .. } if sig == Signal::SIGHUP => {
                Control::hang_up(leader, &master);
                return Ok(());
            }
            Control::Terminal { leader, master, .. } => {
                pty::foreground_group(&*master).unwrap_or(leader)
            }
        };
        match killpg(group, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(format!("cannot send {sig} to request {id}: {e}")),
        }
    }

    /// Gives a terminal session a new window size. Commands without a terminal have no window;
    /// the request is ignored for them, as for unknown ids.
    pub(crate) fn resize(&self, id: RequestId, size: WindowSize) -> Result<(), String> {
        let master = match self.lock().get(&id).map(|r| r.control.clone()) {
            Some(Control::Terminal { master, .. }) => master,
            _ => return Ok(()),
        };
        pty::set_size(&*master, size)
            .map_err(|e| format!("cannot resize the terminal of request {id} to {size}: {e}"))
    }

    /// Ends every command still running (the host connection is gone): commands on pipes are
    /// killed, terminal sessions hung up. A terminal's pump and feeder stop too, so the master
    /// closes and the terminal reads end-of-file in the guest, as when sshd loses its client.
    pub(crate) fn kill_all(&self) {
        for (_, r) in self.lock().drain() {
            if let Some(credits) = &r.credits {
                credits.release();
            }
            match r.control {
                Control::Pipes { pgid } => drop(killpg(pgid, Signal::SIGKILL)),
                Control::Terminal {
                    leader,
                    master,
                    exited,
                } => {
                    Control::hang_up(leader, &master);
                    exited.store(true, Ordering::Release);
                }
            }
        }
    }

    fn remove(&self, id: RequestId) {
        self.lock().remove(&id);
    }
}

/// Starts the command of an `exec` request. Its output, then its `exit`, go to `writer` as
/// they come. `Err` carries the message for the `error` frame.
pub(crate) fn start(
    id: RequestId,
    spec: ExecSpec,
    cfg: &ServeConfig,
    table: &Arc<ExecTable>,
    writer: &Arc<FrameWriter>,
) -> Result<(), String> {
    if table.lock().contains_key(&id) {
        return Err(format!("request id {id} is already running a command"));
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(format!("invalid environment variable {key:?}"));
        }
    }
    // An empty user (OCI images often say `"User": ""`) means the default, as in Docker.
    let user = spec
        .user
        .as_deref()
        .or(cfg.user.as_deref())
        .filter(|u| !u.is_empty());
    let identity = match user {
        Some(u) => Some(users::resolve(u, &cfg.etc).map_err(|e| report(&e))?),
        None => None,
    };
    let (program, arg0, args) = match spec.argv.split_first() {
        Some((program, args)) => (program.clone(), None, args.to_vec()),
        None => {
            let shell = login_shell(identity.as_ref(), &cfg.etc);
            let name = Path::new(&shell)
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_else(|| "sh".to_string());
            // A leading dash makes it a login shell: it reads /etc/profile, as over ssh.
            (shell, Some(format!("-{name}")), Vec::new())
        }
    };
    if program.contains('\0') || args.iter().any(|a| a.contains('\0')) {
        return Err(format!(
            "cannot run {program:?}: an argument contains a NUL byte"
        ));
    }
    let cwd = spec
        .cwd
        .as_ref()
        .map(PathBuf::from)
        .unwrap_or_else(|| cfg.default_cwd.clone());
    if !cwd.is_dir() {
        return Err(format!(
            "cannot run {program:?}: working directory {} does not exist",
            cwd.display()
        ));
    }

    let mut env: BTreeMap<String, String> = cfg.base_env.iter().cloned().collect();
    // HOME is the image's when it sets one (as in Docker), else the user's home from passwd,
    // else root's.
    if !env.contains_key("HOME") {
        let home = identity.as_ref().map_or("/root", |who| who.home_or_root());
        env.insert("HOME".to_string(), home.to_string());
    }
    env.extend(spec.env);
    if spec.terminal.is_some() {
        env.entry("TERM".to_string())
            .or_insert_with(|| DEFAULT_TERM.to_string());
    }
    let mut cmd = Command::new(&program);
    cmd.args(&args).env_clear().envs(&env).current_dir(&cwd);
    if let Some(arg0) = &arg0 {
        cmd.arg0(arg0);
    }
    let launch = Launch {
        id,
        program: &program,
        cwd: &cwd,
        path: env.get("PATH").map(String::as_str).unwrap_or(""),
        table,
        writer,
        credits: spec.output_acks.then(Credits::new),
    };
    match spec.terminal {
        None => {
            cmd.process_group(0);
            in_child(&mut cmd, identity.as_ref(), false);
            launch.piped(cmd)
        }
        Some(size) => {
            let pty = pty::open(size)
                .map_err(|e| format!("cannot open a terminal for {program:?}: {e}"))?;
            if let Some(who) = &identity {
                let group = users::tty_group(&cfg.etc).unwrap_or(who.gid);
                pty::give_to(&pty.slave, who.uid, group).map_err(|e| {
                    format!(
                        "cannot hand the terminal to uid {} for {program:?}: {e}",
                        who.uid
                    )
                })?;
            }
            in_child(&mut cmd, identity.as_ref(), true);
            launch.on_terminal(cmd, pty)
        }
    }
}

/// The login shell for a command without argv: the user's from passwd (root's when no user was
/// named), else `/bin/sh`.
fn login_shell(identity: Option<&Identity>, etc: &Path) -> String {
    let shell = match identity {
        Some(who) => who.shell.clone(),
        None => users::entry_for_uid(Uid::effective().as_raw(), etc).map(|e| e.shell),
    };
    // The passwd file is the image's: only a shell that is there and absolute is taken.
    shell
        .filter(|s| s.starts_with('/') && Path::new(s).is_file())
        .unwrap_or_else(|| FALLBACK_SHELL.to_string())
}

/// Signals whose disposition a command gets back to the default, whatever the agent inherited:
/// an agent started with SIGINT ignored (as a shell's background job is) would otherwise pass
/// that on, and Ctrl-C would stop working in every session.
const RESET_SIGNALS: [libc::c_int; 7] = [
    libc::SIGHUP,
    libc::SIGINT,
    libc::SIGQUIT,
    libc::SIGTERM,
    libc::SIGTSTP,
    libc::SIGTTIN,
    libc::SIGTTOU,
];

/// Arranges what the child does between fork and exec: default signal dispositions, become a
/// session leader on its terminal (with `terminal`), then drop to `identity` (supplementary
/// groups, group, user, in that order: each needs the privileges the next one gives up).
fn in_child(cmd: &mut Command, identity: Option<&Identity>, terminal: bool) {
    // Converted before the fork: the child must not allocate.
    let ids = identity.map(|who| {
        let groups: Vec<Gid> = who.groups.iter().copied().map(Gid::from_raw).collect();
        (Uid::from_raw(who.uid), Gid::from_raw(who.gid), groups)
    });
    // SAFETY: the closure runs in the forked child and only makes async-signal-safe system calls
    // (signal, setsid, ioctl, setgroups, setgid, setuid) on data prepared before the fork; it
    // allocates nothing and takes no locks.
    unsafe {
        cmd.pre_exec(move || {
            for sig in RESET_SIGNALS {
                if libc::signal(sig, libc::SIG_DFL) == libc::SIG_ERR {
                    return Err(io::Error::last_os_error());
                }
            }
            if terminal {
                pty::become_session_leader()?;
            }
            if let Some((uid, gid, groups)) = &ids {
                nix::unistd::setgroups(groups)?;
                nix::unistd::setgid(*gid)?;
                nix::unistd::setuid(*uid)?;
            }
            Ok(())
        });
    }
}

/// Everything needed to start a prepared command and wire it to the host.
struct Launch<'a> {
    id: RequestId,
    program: &'a str,
    cwd: &'a Path,
    path: &'a str,
    table: &'a Arc<ExecTable>,
    writer: &'a Arc<FrameWriter>,
    credits: Option<Arc<Credits>>,
}

impl Launch<'_> {
    fn spawn(&self, cmd: &mut Command) -> Result<Child, String> {
        cmd.spawn()
            .map_err(|e| spawn_error(self.program, self.cwd, self.path, &e))
    }

    /// Runs `cmd` on pipes: stdout and stderr apart, stdin closable.
    fn piped(self, mut cmd: Command) -> Result<(), String> {
        let id = self.id;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = self.spawn(&mut cmd)?;

        let pgid = Pid::from_raw(child.id() as i32);
        let (stdin_tx, stdin_rx) = mpsc::sync_channel(STDIN_QUEUE);
        self.table.lock().insert(
            id,
            Running {
                control: Control::Pipes { pgid },
                stdin: Some(stdin_tx),
                credits: self.credits.clone(),
            },
        );

        if let Some(stdin) = child.stdin.take() {
            let writer = self.writer.clone();
            thread::spawn(move || feed_stdin(stdin, stdin_rx, id, &writer));
        }
        let exited = Arc::new(AtomicBool::new(false));
        let mut pumps = Vec::new();
        if let Some(out) = child.stdout.take() {
            let (writer, exited, credits) =
                (self.writer.clone(), exited.clone(), self.credits.clone());
            pumps.push(thread::spawn(move || {
                pump(
                    out,
                    &exited,
                    |data| GuestMessage::Stdout { id, data },
                    &writer,
                    credits.as_deref(),
                )
            }));
        }
        if let Some(err) = child.stderr.take() {
            let (writer, exited, credits) =
                (self.writer.clone(), exited.clone(), self.credits.clone());
            pumps.push(thread::spawn(move || {
                pump(
                    err,
                    &exited,
                    |data| GuestMessage::Stderr { id, data },
                    &writer,
                    credits.as_deref(),
                )
            }));
        }
        let (table, writer) = (self.table.clone(), self.writer.clone());
        thread::spawn(move || wait_and_report(id, child, pumps, &exited, &table, &writer));
        Ok(())
    }

    /// Runs `cmd` as the leader of a new session on `pty`: one pump for the master, one feeder.
    fn on_terminal(self, mut cmd: Command, pty: pty::Pty) -> Result<(), String> {
        let id = self.id;
        let dup = |fd: &OwnedFd| {
            fd.try_clone()
                .map_err(|e| format!("cannot set up the terminal for {:?}: {e}", self.program))
        };
        let (output, input) = (File::from(dup(&pty.master)?), File::from(dup(&pty.master)?));
        cmd.stdin(Stdio::from(dup(&pty.slave)?))
            .stdout(Stdio::from(dup(&pty.slave)?))
            .stderr(Stdio::from(dup(&pty.slave)?));
        let child = self.spawn(&mut cmd)?;
        // The parent must hold no copy of the slave: the master reads end-of-file (EIO) only
        // once every copy is closed, and the command holds its own.
        drop(cmd);
        drop(pty.slave);

        let leader = Pid::from_raw(child.id() as i32);
        let (stdin_tx, stdin_rx) = mpsc::sync_channel(STDIN_QUEUE);
        let exited = Arc::new(AtomicBool::new(false));
        self.table.lock().insert(
            id,
            Running {
                control: Control::Terminal {
                    leader,
                    master: Arc::new(pty.master),
                    exited: exited.clone(),
                },
                stdin: Some(stdin_tx),
                credits: self.credits.clone(),
            },
        );
        {
            let (writer, exited) = (self.writer.clone(), exited.clone());
            thread::spawn(move || feed_terminal(input, stdin_rx, id, &writer, &exited));
        }
        let pumps = {
            let (writer, exited, credits) =
                (self.writer.clone(), exited.clone(), self.credits.clone());
            // A terminal merges stdout and stderr; all of it is the command's stdout.
            vec![thread::spawn(move || {
                pump(
                    output,
                    &exited,
                    |data| GuestMessage::Stdout { id, data },
                    &writer,
                    credits.as_deref(),
                )
            })]
        };
        let (table, writer) = (self.table.clone(), self.writer.clone());
        thread::spawn(move || wait_and_report(id, child, pumps, &exited, &table, &writer));
        Ok(())
    }
}

fn spawn_error(program: &str, cwd: &Path, path: &str, err: &io::Error) -> String {
    match err.kind() {
        io::ErrorKind::NotFound if resolve(program, cwd, path).is_some() => format!(
            "cannot run {program:?} (in {}): its interpreter or a library it needs was not found",
            cwd.display()
        ),
        io::ErrorKind::NotFound => format!(
            "{program}: command not found (cwd {}, PATH {path})",
            cwd.display()
        ),
        io::ErrorKind::PermissionDenied => format!(
            "cannot run {program:?} (in {}): permission denied",
            cwd.display()
        ),
        _ => format!("cannot run {program:?} (in {}): {err}", cwd.display()),
    }
}

/// Where the kernel would find `program`: as a path when it has a slash, else along `PATH`.
fn resolve(program: &str, cwd: &Path, path: &str) -> Option<PathBuf> {
    if program.contains('/') {
        let p = cwd.join(program);
        return p.exists().then_some(p);
    }
    path.split(':')
        .map(|dir| Path::new(dir).join(program))
        .find(|p| p.is_file())
}

/// Writes queued chunks to the command's stdin, acknowledging each so the host may send more.
fn feed_stdin(
    mut stdin: ChildStdin,
    chunks: Receiver<Vec<u8>>,
    id: RequestId,
    writer: &FrameWriter,
) {
    for chunk in chunks {
        let closed = stdin.write_all(&chunk).is_err();
        // An ack that cannot be sent means the host is gone; the command is killed then anyway.
        let _ = writer.send(&GuestMessage::StdinAck { id, closed });
        if closed {
            // The command closed its stdin; dropping the receiver makes later sends fail fast,
            // and the host stops sending on the `closed` ack.
            return;
        }
    }
}

/// Writes queued chunks to a terminal, acknowledging each. The master is non-blocking: a
/// command that stops reading fills the terminal's input queue, and the feeder then waits in
/// `poll`, looking now and then whether the session ended, instead of blocking for good.
fn feed_terminal(
    master: File,
    chunks: Receiver<Vec<u8>>,
    id: RequestId,
    writer: &FrameWriter,
    exited: &AtomicBool,
) {
    loop {
        let chunk = match chunks.recv_timeout(FEEDER_TICK) {
            Ok(chunk) => chunk,
            Err(RecvTimeoutError::Timeout) if exited.load(Ordering::Acquire) => return,
            Err(RecvTimeoutError::Timeout) => continue,
            // The host closed stdin or the command ended and left the table.
            Err(RecvTimeoutError::Disconnected) => return,
        };
        let closed = write_to_terminal(&master, &chunk, exited).is_err();
        let _ = writer.send(&GuestMessage::StdinAck { id, closed });
        if closed {
            return;
        }
    }
}

fn write_to_terminal(master: &File, mut data: &[u8], exited: &AtomicBool) -> io::Result<()> {
    while !data.is_empty() {
        match (&*master).write(data) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                if exited.load(Ordering::Acquire) {
                    return Err(io::ErrorKind::BrokenPipe.into());
                }
                let mut fds = [PollFd::new(master.as_fd(), PollFlags::POLLOUT)];
                let tick = PollTimeout::from(FEEDER_TICK.as_millis() as u16);
                match poll(&mut fds, tick) {
                    Ok(_) | Err(Errno::EINTR) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Forwards one output pipe (or a terminal's master) as frames built by `frame`, chunk by chunk
/// as the command writes, each after taking a credit when the host acknowledges output.
fn pump<R: Read + AsFd>(
    mut pipe: R,
    exited: &AtomicBool,
    frame: impl Fn(Data) -> GuestMessage,
    writer: &FrameWriter,
    credits: Option<&Credits>,
) {
    let mut buf = vec![0u8; MAX_CHUNK];
    let mut drain_until: Option<Instant> = None;
    loop {
        let after_exit = exited.load(Ordering::Acquire);
        if after_exit {
            let deadline = *drain_until.get_or_insert_with(|| Instant::now() + DRAIN_AFTER_EXIT);
            if Instant::now() >= deadline {
                return;
            }
        }
        // While the command runs, wake now and then only to notice that it exited.
        let timeout_ms: u16 = if after_exit {
            QUIET_AFTER_EXIT.as_millis() as u16
        } else {
            250
        };
        let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(timeout_ms)) {
            Ok(0) if after_exit => return,
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return,
        }
        if let Some(c) = credits {
            if !c.take(CREDIT_WAIT) {
                // Waiting for the reader is not waiting for output: the time the drain after
                // exit allows does not run meanwhile.
                if let Some(d) = drain_until.as_mut() {
                    *d += CREDIT_WAIT;
                }
                continue;
            }
        }
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if writer.send(&frame(Data(buf[..n].to_vec()))).is_err() {
                    return;
                }
            }
            // A terminal's master is non-blocking; a wake-up without data is not an end.
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
                ) =>
            {
                // Nothing was sent for the credit taken.
                if let Some(c) = credits {
                    c.give();
                }
            }
            // EIO on a terminal's master: every copy of the slave is closed.
            Err(_) => return,
        }
    }
}

fn wait_and_report(
    id: RequestId,
    mut child: Child,
    pumps: Vec<JoinHandle<()>>,
    exited: &AtomicBool,
    table: &ExecTable,
    writer: &FrameWriter,
) {
    let status = child.wait();
    exited.store(true, Ordering::Release);
    for p in pumps {
        let _ = p.join();
    }
    table.remove(id);
    let msg = match status {
        Ok(s) => GuestMessage::Exit {
            id,
            code: s.code(),
            signal: s.signal(),
        },
        Err(e) => GuestMessage::Error {
            id,
            message: format!("cannot wait for the command: {e}"),
        },
    };
    // A failed send means the connection is gone; nobody is left to tell.
    let _ = writer.send(&msg);
}
