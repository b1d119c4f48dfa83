//! The agent's wire protocol: the messages host and guest exchange and how they are framed.
//!
//! One byte stream joins the host and the guest agent (a virtio-serial port or a vsock
//! connection). Each message is one line of JSON ended by `\n`; the `op` field names the message.
//! Binary payloads (stdin, stdout, stderr) travel as standard base64 strings. Empty lines are
//! ignored by both ends, which lets a host start with `\n` to end any half line a previous host
//! left behind on a virtio-serial port.
//!
//! Every request carries a host-chosen [`RequestId`]; every guest message names the request it
//! answers, so several commands share one stream. The exchanges are:
//!
//! - `hello` → `ready` (the host's readiness probe; a virtio-serial guest cannot tell whether a
//!   host is connected, so readiness is a `ready` reply and nothing else);
//! - `exec` → any number of `stdout`/`stderr` → one `exit`; meanwhile the host may send
//!   `stdin`, `stdin_close` and `signal` for that id, `resize` when it asked for a terminal, and
//!   `output_ack` for each output frame its reader took when it asked for acks (`output_acks`:
//!   the agent then keeps at most [`OUTPUT_WINDOW`] frames of that command unacknowledged);
//! - `poweroff` → `exit` (code 0 once the shutdown was started), after which the link drops;
//! - `reidentify` → `ready` (a guest restored from a snapshot became the VM the host names);
//! - `work_disk` → `ready` (the work disk at `/root` was unmounted before a warm snapshot, or
//!   mounted after one).
//!
//! An `error` ends the request it names: it answers a request the agent could not carry out
//! (e.g. a program that does not exist). Frames for ids a side does not know are ignored, since
//! a virtio-serial port can deliver leftovers from an earlier host connection.
//!
//! An `exec` with `tty` runs its command on a pseudo-terminal of `rows` x `cols`: the terminal
//! merges the command's stdout and stderr into `stdout` frames, `stdin` is what the user types
//! (byte 0x03 is Ctrl-C, 0x04 Ctrl-D: the terminal turns them into SIGINT and end-of-file),
//! `resize` changes the window size (the command gets SIGWINCH), `signal` goes to the
//! terminal's foreground process group, SIGHUP hangs up the whole session, and `stdin_close`
//! only stops the forwarding (a terminal has no end-of-file of its own). `user` runs the command
//! as another user (OCI syntax: `name`, `uid`, `name:group`, `uid:gid`, ...) resolved against
//! the guest's `/etc/passwd` and `/etc/group`. An empty `argv` runs the user's login shell.
//!
//! Unknown fields are ignored so that a newer host can talk to an older agent and back; an
//! unknown `op` with an id is answered with an `error`. Because an old agent would ignore `tty`
//! and `user` rather than refuse them, `ready` advertises what the agent can do (`stdin_acks`,
//! `tty`, `users`, `output_acks`, `reidentify`, `work_disk`) and the host refuses requests the
//! agent would misread or not understand.

use std::collections::BTreeMap;
use std::fmt;

use base64::Engine as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The agent version a guest reports in `ready`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The longest line either side accepts. Payload chunks are far smaller
/// ([`MAX_CHUNK`]); anything longer is garbage and is skipped.
pub const MAX_LINE: usize = 4 * 1024 * 1024;

/// How reading one frame (one line) ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A whole line is in the buffer (without its `\n`).
    Line,
    /// A line longer than [`MAX_LINE`] was consumed and discarded.
    TooLong,
    /// The stream ended; a partial line is dropped, as its sender is gone.
    Eof,
}

/// The pure half of reading frames, shared by the guest's blocking reader and the host's async
/// one: given what the reader has buffered, it moves bytes up to the next `\n` into the line,
/// never keeping more than [`MAX_LINE`] of it.
#[derive(Debug, Default)]
pub struct LineAssembler {
    too_long: bool,
}

impl LineAssembler {
    /// Takes from `available` into `line`; returns how many bytes to consume from the reader and,
    /// when a line ended, how. Call again with fresh bytes while it returns `None`.
    pub fn feed(&mut self, available: &[u8], line: &mut Vec<u8>) -> (usize, Option<Frame>) {
        let (chunk, end) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (&available[..i], Some(i + 1)),
            None => (available, None),
        };
        if !self.too_long {
            line.extend_from_slice(chunk);
            if line.len() > MAX_LINE {
                self.too_long = true;
                line.clear();
            }
        }
        match end {
            Some(n) if self.too_long => (n, Some(Frame::TooLong)),
            Some(n) => (n, Some(Frame::Line)),
            None => (available.len(), None),
        }
    }
}

/// How many stdin chunks the host keeps in flight (sent but not yet acknowledged) per command.
/// The guest queues more than this per command, so its frame reader never blocks on a command
/// that does not read: signals and other requests always get through.
pub const STDIN_WINDOW: usize = 32;

/// Output frames (`stdout`/`stderr`) of one command the agent sends before it waits for the
/// host's `output_ack`s, when the host asked for them: a reader that stops reading pauses that
/// command only, never the stream the other requests share.
pub const OUTPUT_WINDOW: usize = 32;

/// The largest payload one `stdin`/`stdout`/`stderr` frame carries.
pub const MAX_CHUNK: usize = 32 * 1024;

/// The size of a terminal window, in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct WindowSize {
    pub rows: u16,
    pub cols: u16,
}

impl WindowSize {
    /// What a terminal of unknown size is given: the classic 80x24.
    pub const DEFAULT: WindowSize = WindowSize { rows: 24, cols: 80 };

    /// `rows` x `cols` where both are known and non-zero, else [`WindowSize::DEFAULT`] for the
    /// missing half (a zero size would make full-screen programs draw nothing).
    pub fn or_default(rows: Option<u16>, cols: Option<u16>) -> Self {
        let pick = |v: Option<u16>, d: u16| v.filter(|v| *v > 0).unwrap_or(d);
        WindowSize {
            rows: pick(rows, Self::DEFAULT.rows),
            cols: pick(cols, Self::DEFAULT.cols),
        }
    }
}

impl fmt::Display for WindowSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.cols, self.rows)
    }
}

/// Identifies one request and every frame that belongs to it. Chosen by the host, unique per
/// connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct RequestId(pub u64);

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// Bytes that travel as a base64 string.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct Data(pub Vec<u8>);

impl fmt::Debug for Data {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Data({:?})", String::from_utf8_lossy(&self.0))
    }
}

impl Serialize for Data {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&base64::engine::general_purpose::STANDARD.encode(&self.0))
    }
}

impl<'de> Deserialize<'de> for Data {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        base64::engine::general_purpose::STANDARD
            .decode(text.as_bytes())
            .map(Data)
            .map_err(serde::de::Error::custom)
    }
}

impl From<&[u8]> for Data {
    fn from(bytes: &[u8]) -> Self {
        Data(bytes.to_vec())
    }
}

/// A message from the host to the guest agent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum HostMessage {
    /// Are you there? Answered by [`GuestMessage::Ready`].
    Hello { id: RequestId },
    /// Run a command. `env` adds to (and overrides) the agent's base environment; `cwd`
    /// defaults to the agent's default (`/root`, or the image's working directory). An empty
    /// `argv` runs the user's login shell. With `tty`, the command gets a terminal of `rows` x
    /// `cols` (80x24 where missing); only agents that advertise `tty` in `ready` understand it.
    /// `user` overrides the image's default user; only agents that advertise `users` honour it.
    Exec {
        id: RequestId,
        argv: Vec<String>,
        #[serde(default)]
        env: BTreeMap<String, String>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cwd: Option<String>,
        #[serde(default)]
        tty: bool,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        rows: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        cols: Option<u16>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        user: Option<String>,
        /// The host acknowledges each output frame ([`HostMessage::OutputAck`]) once its reader
        /// took it; the agent keeps at most [`OUTPUT_WINDOW`] unacknowledged. Only for agents
        /// that advertise `output_acks`.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        output_acks: bool,
    },
    /// One output frame of the command reached its reader (see `Exec::output_acks`).
    OutputAck { id: RequestId },
    /// Bytes for the command's standard input.
    Stdin { id: RequestId, data: Data },
    /// End of the command's standard input.
    StdinClose { id: RequestId },
    /// Send a signal (by number) to the command's process group (with a terminal: to its
    /// foreground process group; SIGHUP hangs up the whole session).
    Signal { id: RequestId, signal: i32 },
    /// The terminal window of a `tty` command changed size. Ignored for commands without one.
    Resize { id: RequestId, rows: u16, cols: u16 },
    /// Shut the guest down.
    Poweroff { id: RequestId },
    /// Become the VM the host says: what a guest restored from a snapshot does before it is
    /// used, so no two VMs share an address, MAC, name, host key, machine-id or random state.
    /// `boot` holds the new settings as `banger.*` words, exactly as a kernel command line
    /// carries them (address, gateway, host name, DNS, the host's clock); `mac` is the
    /// interface's new MAC, `machine_id` 32 hex digits, `seed` fresh randomness for the
    /// kernel's pool, `ssh_host_key` the VM's own host key (pinned on the host) for guests
    /// that run sshd. Answered by `ready` once all of it is in place, or `error` (the guest
    /// is then in no state to be used). Only agents that advertise `reidentify`.
    Reidentify {
        id: RequestId,
        boot: String,
        mac: String,
        machine_id: String,
        seed: Data,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ssh_host_key: Option<SshHostKey>,
    },
    /// Unmount (`mounted: false`) or mount (`true`) the work disk at /root: a VM kept as a
    /// warm snapshot has none mounted, so each VM restored from it mounts its own. Answered by
    /// `ready`, or `error` saying what failed (e.g. something still uses /root). Only agents
    /// that advertise `work_disk`.
    WorkDisk { id: RequestId, mounted: bool },
}

/// An SSH host key pair, as OpenSSH writes it (`ssh_host_ed25519_key` and its `.pub`).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshHostKey {
    pub private: String,
    pub public: String,
}

impl fmt::Debug for SshHostKey {
    /// The private half never reaches a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SshHostKey")
            .field("public", &self.public)
            .finish_non_exhaustive()
    }
}

impl HostMessage {
    pub fn id(&self) -> RequestId {
        match self {
            HostMessage::Hello { id }
            | HostMessage::Exec { id, .. }
            | HostMessage::OutputAck { id }
            | HostMessage::Stdin { id, .. }
            | HostMessage::StdinClose { id }
            | HostMessage::Signal { id, .. }
            | HostMessage::Resize { id, .. }
            | HostMessage::Poweroff { id }
            | HostMessage::Reidentify { id, .. }
            | HostMessage::WorkDisk { id, .. } => *id,
        }
    }
}

/// A message from the guest agent to the host.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GuestMessage {
    /// The agent is up and serving.
    Ready {
        id: RequestId,
        hostname: String,
        agent_version: String,
        /// `/proc/sys/kernel/random/boot_id`: changes on every boot, so the host can tell a
        /// rebooted guest from the one it talked to before.
        boot_id: String,
        /// The agent acknowledges stdin chunks ([`GuestMessage::StdinAck`]), so the host may keep
        /// at most [`STDIN_WINDOW`] unacknowledged. Agents that predate it omit the field.
        #[serde(default)]
        stdin_acks: bool,
        /// The agent runs `exec` with `tty` on a pseudo-terminal and understands `resize`.
        /// Older agents omit it (and refuse or misread a `tty` exec).
        #[serde(default)]
        tty: bool,
        /// The agent runs commands as the image's user or the request's `user`. Older agents
        /// omit it (and would run the command as root).
        #[serde(default)]
        users: bool,
        /// The agent holds a command's output back until the host acknowledges it, when the
        /// `exec` asks for that. Older agents omit it.
        #[serde(default)]
        output_acks: bool,
        /// The agent understands `reidentify`. Older agents omit it.
        #[serde(default)]
        reidentify: bool,
        /// The agent understands `work_disk`. Older agents omit it.
        #[serde(default)]
        work_disk: bool,
    },
    /// One stdin chunk of the command was written to it (or dropped, with `closed`, because the
    /// command closed its stdin; later chunks are dropped too).
    StdinAck {
        id: RequestId,
        #[serde(default)]
        closed: bool,
    },
    Stdout {
        id: RequestId,
        data: Data,
    },
    Stderr {
        id: RequestId,
        data: Data,
    },
    /// The command ended: exactly one of `code` (it exited) and `signal` (it was killed) is set.
    Exit {
        id: RequestId,
        #[serde(default)]
        code: Option<i32>,
        #[serde(default)]
        signal: Option<i32>,
    },
    /// The request failed; nothing more follows for this id.
    Error {
        id: RequestId,
        message: String,
    },
}

impl GuestMessage {
    pub fn id(&self) -> RequestId {
        match self {
            GuestMessage::Ready { id, .. }
            | GuestMessage::StdinAck { id, .. }
            | GuestMessage::Stdout { id, .. }
            | GuestMessage::Stderr { id, .. }
            | GuestMessage::Exit { id, .. }
            | GuestMessage::Error { id, .. } => *id,
        }
    }
}

/// How a command ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    /// It exited with this code.
    Code(i32),
    /// A signal (by number) killed it.
    Signal(i32),
}

impl ExitStatus {
    /// Reads the `code`/`signal` pair of an `exit` frame, which the guest wrote and which is
    /// therefore untrusted: a frame with neither, an exit code outside 0-255 or a signal number
    /// outside 1-127 counts as a failure (code 255), never as a success and never as a number
    /// that overflows `128 + signal`.
    pub fn from_wire(code: Option<i32>, signal: Option<i32>) -> Self {
        match (code, signal) {
            (Some(c), _) if (0..=255).contains(&c) => ExitStatus::Code(c),
            (None, Some(s)) if (1..=127).contains(&s) => ExitStatus::Signal(s),
            _ => ExitStatus::Code(255),
        }
    }

    pub fn success(self) -> bool {
        self == ExitStatus::Code(0)
    }

    /// The shell's convention: the code, or 128 + the signal number.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c,
            ExitStatus::Signal(s) => s.saturating_add(128),
        }
    }
}

impl fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitStatus::Code(c) => write!(f, "exit code {c}"),
            ExitStatus::Signal(s) => match signal_name(*s) {
                Some(name) => write!(f, "killed by signal {s} ({name})"),
                None => write!(f, "killed by signal {s}"),
            },
        }
    }
}

fn signal_name(signal: i32) -> Option<&'static str> {
    nix::sys::signal::Signal::try_from(signal)
        .ok()
        .map(|s| s.as_str())
}

/// A line that is not a message this side understands.
#[derive(Debug, thiserror::Error)]
#[error("malformed agent frame ({len} bytes)")]
pub struct DecodeError {
    /// The request id, when the line had a readable one: the receiver can answer with an
    /// `error` for that request.
    pub id: Option<RequestId>,
    len: usize,
    #[source]
    source: serde_json::Error,
}

/// Serialises one message as a frame: JSON followed by `\n`.
pub fn encode<T: Serialize>(msg: &T) -> Vec<u8> {
    // Serialising these types cannot fail: every map key is a string and no Serialize impl
    // reports an error. Should that ever change, an empty line is ignored by the peer.
    let mut line = serde_json::to_vec(msg).unwrap_or_default();
    line.push(b'\n');
    line
}

/// Parses one frame (without or with its trailing newline).
pub fn decode<T: serde::de::DeserializeOwned>(line: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(line).map_err(|source| DecodeError {
        id: request_id_of(line),
        len: line.len(),
        source,
    })
}

/// Whether a line carries nothing (blank lines are keep-alives and resynchronisation points).
pub fn is_blank(line: &[u8]) -> bool {
    line.iter().all(u8::is_ascii_whitespace)
}

fn request_id_of(line: &[u8]) -> Option<RequestId> {
    #[derive(Deserialize)]
    struct OnlyId {
        id: RequestId,
    }
    serde_json::from_slice::<OnlyId>(line).ok().map(|o| o.id)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn wire<T: Serialize>(msg: &T) -> serde_json::Value {
        let line = encode(msg);
        assert_eq!(line.last(), Some(&b'\n'));
        assert_eq!(line.iter().filter(|b| **b == b'\n').count(), 1);
        serde_json::from_slice(&line).unwrap()
    }

    #[test]
    fn exec_request_has_the_documented_shape_and_round_trips() {
        let msg = HostMessage::Exec {
            id: RequestId(7),
            argv: vec!["sh".into(), "-c".into(), "echo hi".into()],
            env: BTreeMap::from([("A".to_string(), "1".to_string())]),
            cwd: Some("/tmp".into()),
            tty: false,
            rows: None,
            cols: None,
            user: None,
            output_acks: false,
        };
        assert_eq!(
            wire(&msg),
            json!({"op": "exec", "id": 7, "argv": ["sh", "-c", "echo hi"],
                   "env": {"A": "1"}, "cwd": "/tmp", "tty": false})
        );
        let back: HostMessage = decode(&encode(&msg)).unwrap();
        assert_eq!(back, msg);
    }

    #[test]
    fn a_terminal_exec_carries_its_window_size_and_user() {
        let msg = HostMessage::Exec {
            id: RequestId(8),
            argv: vec![],
            env: BTreeMap::new(),
            cwd: None,
            tty: true,
            rows: Some(40),
            cols: Some(132),
            user: Some("app:staff".into()),
            output_acks: false,
        };
        assert_eq!(
            wire(&msg),
            json!({"op": "exec", "id": 8, "argv": [], "env": {}, "tty": true,
                   "rows": 40, "cols": 132, "user": "app:staff"})
        );
        assert_eq!(decode::<HostMessage>(&encode(&msg)).unwrap(), msg);
    }

    #[test]
    fn window_sizes_default_to_80x24_where_unknown_or_zero() {
        assert_eq!(
            WindowSize::or_default(Some(50), Some(0)),
            WindowSize { rows: 50, cols: 80 }
        );
        assert_eq!(WindowSize::or_default(None, None), WindowSize::DEFAULT);
        assert_eq!(WindowSize::DEFAULT.to_string(), "80x24");
    }

    #[test]
    fn a_window_size_out_of_range_is_a_malformed_frame() {
        let err =
            decode::<HostMessage>(br#"{"op":"resize","id":3,"rows":70000,"cols":80}"#).unwrap_err();
        assert_eq!(err.id, Some(RequestId(3)));
        let err =
            decode::<HostMessage>(br#"{"op":"resize","id":4,"rows":-1,"cols":80}"#).unwrap_err();
        assert_eq!(err.id, Some(RequestId(4)));
    }

    #[test]
    fn exec_request_fields_other_than_id_and_argv_are_optional() {
        let msg: HostMessage = decode(br#"{"op":"exec","id":1,"argv":["true"]}"#).unwrap();
        assert_eq!(
            msg,
            HostMessage::Exec {
                id: RequestId(1),
                argv: vec!["true".into()],
                env: BTreeMap::new(),
                cwd: None,
                tty: false,
                rows: None,
                cols: None,
                user: None,
                output_acks: false,
            }
        );
    }

    #[test]
    fn binary_payloads_travel_as_base64() {
        let msg = GuestMessage::Stdout {
            id: RequestId(3),
            data: Data(vec![0, 255, b'\n', b'h']),
        };
        assert_eq!(
            wire(&msg),
            json!({"op": "stdout", "id": 3, "data": "AP8KaA=="})
        );
        assert_eq!(decode::<GuestMessage>(&encode(&msg)).unwrap(), msg);
    }

    #[test]
    fn every_host_message_round_trips() {
        let all = [
            HostMessage::Hello { id: RequestId(1) },
            HostMessage::Stdin {
                id: RequestId(2),
                data: Data(b"abc".to_vec()),
            },
            HostMessage::StdinClose { id: RequestId(3) },
            HostMessage::Signal {
                id: RequestId(4),
                signal: 15,
            },
            HostMessage::Poweroff { id: RequestId(5) },
            HostMessage::Resize {
                id: RequestId(6),
                rows: 50,
                cols: 200,
            },
            HostMessage::OutputAck { id: RequestId(7) },
            HostMessage::Reidentify {
                id: RequestId(8),
                boot: "banger.ip=172.16.0.9/24 banger.hostname=web2".into(),
                mac: "02:ba:ac:10:00:09".into(),
                machine_id: "0123456789abcdef0123456789abcdef".into(),
                seed: Data(vec![7; 32]),
                ssh_host_key: Some(SshHostKey {
                    private: "-----BEGIN OPENSSH PRIVATE KEY-----".into(),
                    public: "ssh-ed25519 AAAA".into(),
                }),
            },
            HostMessage::WorkDisk {
                id: RequestId(9),
                mounted: false,
            },
            HostMessage::WorkDisk {
                id: RequestId(10),
                mounted: true,
            },
        ];
        let ops = [
            "hello",
            "stdin",
            "stdin_close",
            "signal",
            "poweroff",
            "resize",
            "output_ack",
            "reidentify",
            "work_disk",
            "work_disk",
        ];
        for (msg, op) in all.iter().zip(ops) {
            assert_eq!(wire(msg)["op"], op);
            assert_eq!(&decode::<HostMessage>(&encode(msg)).unwrap(), msg);
        }
        assert_eq!(
            wire(&all[8]),
            json!({"op": "work_disk", "id": 9, "mounted": false})
        );
    }

    #[test]
    fn every_guest_message_round_trips() {
        let all = [
            GuestMessage::Ready {
                id: RequestId(1),
                hostname: "dev".into(),
                agent_version: "0.1.0".into(),
                boot_id: "b0".into(),
                stdin_acks: true,
                tty: true,
                users: true,
                output_acks: true,
                reidentify: true,
                work_disk: true,
            },
            GuestMessage::StdinAck {
                id: RequestId(5),
                closed: true,
            },
            GuestMessage::Stderr {
                id: RequestId(2),
                data: Data(b"oops".to_vec()),
            },
            GuestMessage::Exit {
                id: RequestId(3),
                code: None,
                signal: Some(9),
            },
            GuestMessage::Error {
                id: RequestId(4),
                message: "no".into(),
            },
        ];
        for msg in &all {
            assert_eq!(&decode::<GuestMessage>(&encode(msg)).unwrap(), msg);
        }
        assert_eq!(
            wire(&all[3]),
            json!({"op": "exit", "id": 3, "code": null, "signal": 9})
        );
    }

    #[test]
    fn a_ready_from_an_old_agent_reads_as_no_acks_no_tty_and_no_users() {
        let msg: GuestMessage = decode(
            br#"{"op":"ready","id":1,"hostname":"h","agent_version":"0.1.0","boot_id":"b"}"#,
        )
        .unwrap();
        assert!(matches!(
            msg,
            GuestMessage::Ready {
                stdin_acks: false,
                tty: false,
                users: false,
                output_acks: false,
                reidentify: false,
                work_disk: false,
                ..
            }
        ));
    }

    #[test]
    fn unknown_fields_are_ignored_for_compatibility() {
        let msg: HostMessage = decode(br#"{"op":"hello","id":9,"future":true}"#).unwrap();
        assert_eq!(msg, HostMessage::Hello { id: RequestId(9) });
    }

    #[test]
    fn a_malformed_frame_still_yields_its_id_when_it_has_one() {
        let err = decode::<HostMessage>(br#"{"op":"teleport","id":12}"#).unwrap_err();
        assert_eq!(err.id, Some(RequestId(12)));
        let err = decode::<HostMessage>(b"not json").unwrap_err();
        assert_eq!(err.id, None);
        let err = decode::<HostMessage>(br#"{"op":"stdin","id":1,"data":"!!"}"#).unwrap_err();
        assert_eq!(err.id, Some(RequestId(1)));
    }

    #[test]
    fn exit_status_reads_the_wire_pair_and_prints_for_people() {
        assert_eq!(ExitStatus::from_wire(Some(7), None), ExitStatus::Code(7));
        assert_eq!(ExitStatus::from_wire(None, Some(9)), ExitStatus::Signal(9));
        assert!(!ExitStatus::from_wire(None, None).success());
        assert_eq!(
            ExitStatus::Signal(9).to_string(),
            "killed by signal 9 (SIGKILL)"
        );
        assert_eq!(ExitStatus::Code(3).to_string(), "exit code 3");
        assert_eq!(ExitStatus::Signal(15).shell_code(), 143);
        // A hostile guest's numbers: failures, never overflows or successes.
        for (code, signal) in [
            (Some(-1), None),
            (Some(256), None),
            (Some(i32::MIN), None),
            (None, Some(i32::MAX)),
            (None, Some(0)),
            (None, Some(-9)),
            (None, Some(128)),
            (None, None),
        ] {
            let status = ExitStatus::from_wire(code, signal);
            assert_eq!(status, ExitStatus::Code(255), "{code:?} {signal:?}");
            assert_eq!(status.shell_code(), 255);
        }
        assert_eq!(
            ExitStatus::from_wire(None, Some(64)),
            ExitStatus::Signal(64)
        );
        assert_eq!(ExitStatus::Signal(i32::MAX).shell_code(), i32::MAX);
    }

    #[test]
    fn blank_lines_are_recognised() {
        assert!(is_blank(b""));
        assert!(is_blank(b" \r\n"));
        assert!(!is_blank(b"{}"));
    }
}
