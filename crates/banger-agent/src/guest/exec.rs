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
//! The serve loop owns an [`ExecTable`] per host connection; when the connection ends, every
//! command still running for it is killed, since nobody is left to read its output.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;

use crate::guest::serve::{FrameWriter, ServeConfig};
use crate::protocol::{Data, GuestMessage, RequestId, MAX_CHUNK, STDIN_WINDOW};

/// How many stdin chunks may wait for a command that is slow to read. Hosts that take acks keep
/// at most [`STDIN_WINDOW`] in flight, so the queue never fills and the serve loop never blocks on
/// it; for older hosts, a full queue blocks the serve loop, which pushes back through the stream.
const STDIN_QUEUE: usize = 2 * STDIN_WINDOW;
/// After the command exited, a pump stops once its pipe stayed quiet this long.
const QUIET_AFTER_EXIT: Duration = Duration::from_millis(50);
/// After the command exited, a pump stops after this long even if background processes keep
/// writing.
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// What an `exec` request asks for.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: Option<String>,
    pub tty: bool,
}

struct Running {
    pgid: Pid,
    /// Dropping the sender closes the command's stdin.
    stdin: Option<SyncSender<Vec<u8>>>,
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

    /// Sends `signal` to the command's process group.
    pub(crate) fn signal(&self, id: RequestId, signal: i32) -> Result<(), String> {
        let Some(pgid) = self.lock().get(&id).map(|r| r.pgid) else {
            return Ok(());
        };
        let sig = Signal::try_from(signal).map_err(|_| format!("{signal} is not a signal"))?;
        match killpg(pgid, sig) {
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(e) => Err(format!("cannot send {sig} to request {id}: {e}")),
        }
    }

    /// Kills every command still running (the host connection is gone).
    pub(crate) fn kill_all(&self) {
        for (_, r) in self.lock().drain() {
            let _ = killpg(r.pgid, Signal::SIGKILL);
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
    if spec.tty {
        return Err("exec with a terminal (tty) is not supported; \
                    hint: use `banger vm ssh` for interactive sessions"
            .to_string());
    }
    let Some(program) = spec.argv.first() else {
        return Err("exec needs a command (argv is empty)".to_string());
    };
    if table.lock().contains_key(&id) {
        return Err(format!("request id {id} is already running a command"));
    }
    for (key, value) in &spec.env {
        if key.is_empty() || key.contains(['=', '\0']) || value.contains('\0') {
            return Err(format!("invalid environment variable {key:?}"));
        }
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
    env.extend(spec.env);
    let mut child = Command::new(program)
        .args(&spec.argv[1..])
        .env_clear()
        .envs(&env)
        .current_dir(&cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .map_err(|e| spawn_error(program, &cwd, env.get("PATH"), &e))?;

    let pgid = Pid::from_raw(child.id() as i32);
    let (stdin_tx, stdin_rx) = mpsc::sync_channel(STDIN_QUEUE);
    table.lock().insert(
        id,
        Running {
            pgid,
            stdin: Some(stdin_tx),
        },
    );

    if let Some(stdin) = child.stdin.take() {
        let writer = writer.clone();
        thread::spawn(move || feed_stdin(stdin, stdin_rx, id, &writer));
    }
    let exited = Arc::new(AtomicBool::new(false));
    let mut pumps = Vec::new();
    if let Some(out) = child.stdout.take() {
        let (writer, exited) = (writer.clone(), exited.clone());
        pumps.push(thread::spawn(move || {
            pump(
                out,
                &exited,
                |data| GuestMessage::Stdout { id, data },
                &writer,
            )
        }));
    }
    if let Some(err) = child.stderr.take() {
        let (writer, exited) = (writer.clone(), exited.clone());
        pumps.push(thread::spawn(move || {
            pump(
                err,
                &exited,
                |data| GuestMessage::Stderr { id, data },
                &writer,
            )
        }));
    }
    let (table, writer) = (table.clone(), writer.clone());
    thread::spawn(move || wait_and_report(id, child, pumps, &exited, &table, &writer));
    Ok(())
}

fn spawn_error(program: &str, cwd: &Path, path: Option<&String>, err: &io::Error) -> String {
    let path = path.map(String::as_str).unwrap_or("");
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

/// Forwards one output pipe as frames built by `frame`, chunk by chunk as the command writes.
fn pump<R: Read + AsFd>(
    mut pipe: R,
    exited: &AtomicBool,
    frame: impl Fn(Data) -> GuestMessage,
    writer: &FrameWriter,
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
        match pipe.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => {
                if writer.send(&frame(Data(buf[..n].to_vec()))).is_err() {
                    return;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
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
