//! Serving one host connection: reading request frames, answering them, and multiplexing the
//! output of the commands they start back onto the same stream.
//!
//! A "session" is one stretch of a byte stream with a host at the other end: a vsock
//! connection, or the time between a host connecting to and leaving a virtio-serial port
//! (the port reads as end-of-file while no host is connected). The transport is someone else's
//! business ([`crate::guest::transport`]); this module works on any `Read` plus a shared
//! [`FrameWriter`], which is also how the tests drive it over a socket pair.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread;

use crate::guest::exec::{self, ExecSpec, ExecTable};
use crate::guest::identity::{Identity, IdentityControl, SystemIdentity};
use crate::guest::power::{PowerControl, SystemPower};
use crate::image::DEFAULT_HOME;
use crate::protocol::{
    decode, encode, is_blank, Frame, GuestMessage, HostMessage, LineAssembler, RequestId,
    WindowSize, AGENT_VERSION, MAX_LINE,
};

/// Where the kernel publishes the identifier of the current boot.
pub const BOOT_ID_PATH: &str = "/proc/sys/kernel/random/boot_id";

/// The environment every command starts from; the request's `env` adds to it. `HOME` is not
/// here: it is the home of the user the command runs as (see `exec`).
pub const BASE_ENV: [(&str, &str); 2] = [
    (
        "PATH",
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    ),
    ("LANG", "C.UTF-8"),
];

/// The one way frames reach the host. Every frame is written whole under one lock, so frames
/// from concurrent commands never interleave, even where the transport splits large writes.
pub struct FrameWriter {
    out: Mutex<Box<dyn Write + Send>>,
}

impl FrameWriter {
    pub fn new(out: impl Write + Send + 'static) -> Self {
        FrameWriter {
            out: Mutex::new(Box::new(out)),
        }
    }

    pub fn send(&self, msg: &GuestMessage) -> io::Result<()> {
        let frame = encode(msg);
        // A writer that panicked mid-frame would have left a half line; the peer skips it as
        // malformed, so carrying on is better than refusing every later frame.
        let mut out = self.out.lock().unwrap_or_else(PoisonError::into_inner);
        out.write_all(&frame)?;
        out.flush()
    }
}

/// What the serve loop needs to know about the guest it runs in.
pub struct ServeConfig {
    /// Where commands run when the request names no `cwd`.
    pub default_cwd: PathBuf,
    /// The environment every command starts from.
    pub base_env: Vec<(String, String)>,
    /// Who commands run as when the request names nobody: the image's `User` in OCI syntax
    /// (`name`, `uid`, `name:group`, `uid:gid`, ...). `None` (or empty) runs them as the agent
    /// runs, root.
    pub user: Option<String>,
    /// The guest's `/etc`, where users and groups are looked up.
    pub etc: PathBuf,
    pub power: Arc<dyn PowerControl>,
    /// How the guest takes on a new identity (`reidentify`, after a restore) and swaps its
    /// work disk (`work_disk`, around a warm snapshot).
    pub identity: Arc<dyn IdentityControl>,
}

impl ServeConfig {
    /// The configuration of a real guest: `/root`, [`BASE_ENV`], root, `/etc`, real power-off.
    pub fn guest() -> Self {
        ServeConfig {
            default_cwd: PathBuf::from("/root"),
            base_env: BASE_ENV
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            user: None,
            etc: PathBuf::from("/etc"),
            power: Arc::new(SystemPower),
            identity: Arc::new(SystemIdentity::default()),
        }
    }

    /// Creates the default working directory where it is missing, as Docker does for an
    /// image's WorkingDir. Called whenever the work disk was mounted (at start, and after a
    /// `work_disk` mount), since the directory may be on it; `/root` is the work disk's own
    /// mount point, never made here.
    pub(crate) fn create_working_dir(&self) {
        let dir = &self.default_cwd;
        if dir == Path::new(DEFAULT_HOME) || dir.is_dir() {
            return;
        }
        match std::fs::create_dir_all(dir) {
            Ok(()) => log(format_args!("working directory {} created", dir.display())),
            Err(e) => log(format_args!(
                "working directory {}: cannot create it: {e}",
                dir.display()
            )),
        }
    }
}

/// What a finished session did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionSummary {
    /// Non-blank lines read: zero means no host was there at all.
    pub frames: u64,
}

/// Serves requests read from `reader` until it reaches end-of-file (`Ok`) or fails (`Err`),
/// answering through `writer`. Commands still running when the session ends are killed.
pub fn serve_session<R: Read>(
    reader: R,
    writer: &Arc<FrameWriter>,
    cfg: &Arc<ServeConfig>,
) -> io::Result<SessionSummary> {
    let execs = Arc::new(ExecTable::default());
    let _kill = KillOnDrop(execs.clone());
    let mut reader = BufReader::with_capacity(64 * 1024, reader);
    let mut summary = SessionSummary::default();
    let mut line = Vec::new();
    loop {
        line.clear();
        match read_frame(&mut reader, &mut line)? {
            Frame::Eof => return Ok(summary),
            Frame::TooLong => {
                log(format_args!("skipped a frame longer than {MAX_LINE} bytes"));
                continue;
            }
            Frame::Line if is_blank(&line) => continue,
            Frame::Line => {}
        }
        summary.frames += 1;
        match decode::<HostMessage>(&line) {
            Ok(msg) => handle(msg, &execs, writer, cfg),
            Err(e) => {
                log(format_args!("{}", report(&e)));
                if let Some(id) = e.id {
                    reply(
                        writer,
                        GuestMessage::Error {
                            id,
                            message: format!(
                                "the agent (version {AGENT_VERSION}) does not understand this request: {}",
                                report(&e)
                            ),
                        },
                    );
                }
            }
        }
    }
}

struct KillOnDrop(Arc<ExecTable>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        self.0.kill_all();
    }
}

fn handle(
    msg: HostMessage,
    execs: &Arc<ExecTable>,
    writer: &Arc<FrameWriter>,
    cfg: &Arc<ServeConfig>,
) {
    match msg {
        HostMessage::Hello { id } => reply(writer, ready(id)),
        HostMessage::Exec {
            id,
            argv,
            env,
            cwd,
            tty,
            rows,
            cols,
            user,
            output_acks,
        } => {
            let spec = ExecSpec {
                argv,
                env,
                cwd,
                terminal: tty.then(|| WindowSize::or_default(rows, cols)),
                user,
                output_acks,
            };
            if let Err(message) = exec::start(id, spec, cfg, execs, writer) {
                reply(writer, GuestMessage::Error { id, message });
            }
        }
        HostMessage::OutputAck { id } => execs.output_ack(id),
        HostMessage::Stdin { id, data } => execs.stdin(id, data.0),
        HostMessage::StdinClose { id } => execs.close_stdin(id),
        HostMessage::Signal { id, signal } => {
            if let Err(e) = execs.signal(id, signal) {
                log(format_args!("signal: {e}"));
            }
        }
        HostMessage::Resize { id, rows, cols } => {
            if let Err(e) = execs.resize(id, WindowSize { rows, cols }) {
                log(format_args!("resize: {e}"));
            }
        }
        HostMessage::Reidentify {
            id,
            boot,
            mac,
            machine_id,
            seed,
            ssh_host_key,
        } => {
            let result = Identity::from_request(&boot, &mac, &machine_id, seed.0, ssh_host_key)
                .and_then(|identity| {
                    log(format_args!("becoming {identity:?}"));
                    cfg.identity.become_vm(&identity)
                });
            match result {
                Ok(()) => reply(writer, ready(id)),
                Err(message) => {
                    log(format_args!("reidentify: FAILED: {message}"));
                    reply(
                        writer,
                        GuestMessage::Error {
                            id,
                            message: format!("cannot take on the new identity: {message}"),
                        },
                    );
                }
            }
        }
        HostMessage::WorkDisk { id, mounted } => {
            let verb = if mounted { "mount" } else { "unmount" };
            match cfg.identity.work_disk(mounted) {
                Ok(()) => {
                    log(format_args!("work disk: {verb}ed at the host's request"));
                    if mounted {
                        cfg.create_working_dir();
                    }
                    reply(writer, ready(id));
                }
                Err(message) => {
                    log(format_args!("work disk: {verb}: FAILED: {message}"));
                    reply(
                        writer,
                        GuestMessage::Error {
                            id,
                            message: format!("cannot {verb} the work disk: {message}"),
                        },
                    );
                }
            }
        }
        HostMessage::Poweroff { id } => {
            log(format_args!("poweroff requested by the host"));
            let (writer, power) = (writer.clone(), cfg.power.clone());
            // Off the reader thread: systemctl may take a moment and must not hold up frames.
            thread::spawn(move || {
                power.power_off(&|result| {
                    let msg = match result {
                        Ok(()) => GuestMessage::Exit {
                            id,
                            code: Some(0),
                            signal: None,
                        },
                        Err(message) => GuestMessage::Error { id, message },
                    };
                    reply(&writer, msg);
                });
            });
        }
    }
}

fn ready(id: RequestId) -> GuestMessage {
    let hostname = nix::unistd::gethostname()
        .map(|h| h.to_string_lossy().into_owned())
        .unwrap_or_default();
    let boot_id = fs_err::read_to_string(BOOT_ID_PATH)
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    GuestMessage::Ready {
        id,
        hostname,
        agent_version: AGENT_VERSION.to_string(),
        boot_id,
        stdin_acks: true,
        tty: true,
        users: true,
        output_acks: true,
        reidentify: true,
        work_disk: true,
    }
}

fn reply(writer: &FrameWriter, msg: GuestMessage) {
    if let Err(e) = writer.send(&msg) {
        log(format_args!("cannot answer request {}: {e}", msg.id()));
    }
}

/// Reads one line into `buf` (see [`LineAssembler`]).
fn read_frame(reader: &mut impl BufRead, buf: &mut Vec<u8>) -> io::Result<Frame> {
    let mut assembler = LineAssembler::default();
    loop {
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(Frame::Eof);
        }
        let (consumed, done) = assembler.feed(available, buf);
        reader.consume(consumed);
        if let Some(frame) = done {
            return Ok(frame);
        }
    }
}

/// An error and its causes on one line, each cause once.
pub(crate) fn report(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// One line to stderr, which systemd sends to the journal.
pub(crate) fn log(args: std::fmt::Arguments<'_>) {
    eprintln!("banger-agent: {args}");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(input: &[u8]) -> Vec<Result<Vec<u8>, &'static str>> {
        let mut reader = BufReader::with_capacity(7, input);
        let mut out = Vec::new();
        loop {
            let mut buf = Vec::new();
            match read_frame(&mut reader, &mut buf).unwrap() {
                Frame::Eof => return out,
                Frame::TooLong => out.push(Err("too long")),
                Frame::Line => out.push(Ok(buf)),
            }
        }
    }

    #[test]
    fn lines_are_split_across_buffer_boundaries_and_a_trailing_partial_line_is_dropped() {
        assert_eq!(
            frames(b"{\"op\":\"hello\"}\n\nabc\npartial"),
            vec![
                Ok(b"{\"op\":\"hello\"}".to_vec()),
                Ok(vec![]),
                Ok(b"abc".to_vec())
            ]
        );
    }

    #[test]
    fn a_missing_working_directory_is_created() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = ServeConfig {
            default_cwd: dir.path().join("srv/app"),
            ..ServeConfig::guest()
        };
        cfg.create_working_dir();
        assert!(cfg.default_cwd.is_dir());
        // Already there: left alone.
        cfg.create_working_dir();
        assert!(cfg.default_cwd.is_dir());
    }

    #[test]
    fn an_overlong_line_is_skipped_and_the_next_one_read() {
        let mut input = vec![b'x'; MAX_LINE + 10];
        input.extend_from_slice(b"\nnext\n");
        assert_eq!(frames(&input), vec![Err("too long"), Ok(b"next".to_vec())]);
    }
}
