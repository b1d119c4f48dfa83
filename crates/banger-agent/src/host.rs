//! The host side of the agent protocol: an async client the daemon uses to probe a guest's
//! readiness, run commands in it, make a restored guest its own VM (its identity, its work
//! disk) and power it off (feature `host`, tokio).
//!
//! One [`AgentClient`] owns one connection. A background task reads the guest's frames and
//! hands each to the request it answers (by request id), so any number of commands can run at
//! once over the single stream; frames for ids this client never issued — leftovers a
//! virtio-serial port kept from an earlier host connection — are dropped. When the connection
//! ends, every request still waiting fails with [`AgentError::ConnectionLost`], which names
//! the VM.
//!
//! The agent's `ready` says what it can do; the client remembers it and refuses requests an
//! older agent would misread or not know (a terminal, another user, a new identity, the work
//! disk) with [`AgentError::Unsupported`]
//! instead of letting them run differently from what was asked. If no `hello` was answered on
//! the connection yet, such a request says `hello` first.
//!
//! How bytes reach the guest is left open: [`AgentClient::new`] takes any async stream (the
//! daemon may get one from its VMM layer), and [`AgentClient::connect`] opens the two host
//! channels the agent serves — QEMU's virtio-serial Unix socket and Firecracker's vsock bridge.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use banger_hint::Hint;
use bytes::Bytes;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::guest::serve::report;
use crate::protocol::{
    decode, encode, is_blank, Data, ExitStatus, Frame, GuestMessage, HostMessage, LineAssembler,
    RequestId, WindowSize, MAX_CHUNK, STDIN_WINDOW,
};

/// How long a Firecracker vsock handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long [`wait_ready`] waits for one `hello` before asking again on the same connection.
const HELLO_RETRY: Duration = Duration::from_secs(2);
/// Pause between connection attempts in [`wait_ready`].
const RECONNECT_PAUSE: Duration = Duration::from_millis(200);
/// How long an exec that needs the agent's capabilities waits for the `hello` that tells them.
const CAPABILITY_HELLO: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot connect to the agent of VM {vm} at {endpoint}")]
    Connect {
        vm: String,
        endpoint: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "Firecracker refused the vsock connection to the agent of VM {vm} (port {port}): {reply:?}"
    )]
    VsockRefused {
        vm: String,
        port: u32,
        reply: String,
    },
    #[error("lost the agent connection to VM {vm}: {reason}")]
    ConnectionLost { vm: String, reason: String },
    #[error("the agent of VM {vm} did not answer within {waited:?}")]
    NoAnswer { vm: String, waited: Duration },
    #[error("the agent of VM {vm} did not become ready within {waited:?} (last attempt: {last})")]
    NotReady {
        vm: String,
        waited: Duration,
        last: String,
    },
    /// The agent answered the request with an `error` frame.
    #[error("VM {vm}: {message}")]
    Guest { vm: String, message: String },
    #[error("VM {vm}: the guest did not power off: {reason}")]
    Poweroff { vm: String, reason: String },
    #[error("VM {vm}: the command no longer reads its input (it closed stdin or ended)")]
    StdinClosed { vm: String },
    /// The agent in the guest predates a feature the request needs.
    #[error("the agent of VM {vm} (version {agent_version}) cannot {what}")]
    Unsupported {
        vm: String,
        agent_version: String,
        what: &'static str,
    },
}

/// The host client's error types that carry hints, for a [`banger_hint::Report`] of an error
/// chain (re-exported as `banger_agent::HINTS`). Every type here that implements [`Hint`] must
/// be listed: Rust cannot enumerate a trait's implementations.
pub const HINTS: &[banger_hint::Probe] = &[banger_hint::probe::<AgentError>];

impl Hint for AgentError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            AgentError::Connect { .. } | AgentError::VsockRefused { .. } => {
                Some("check that the VM is running (`banger vm list`)".into())
            }
            AgentError::ConnectionLost { .. } => {
                Some("the VM may have shut down or crashed; its console log tells which".into())
            }
            AgentError::NoAnswer { .. } | AgentError::NotReady { .. } => Some(
                "the guest may have failed to boot or lack banger-agent; check the VM's console \
                 log"
                .into(),
            ),
            AgentError::Unsupported { .. } => Some(
                "the VM's agent is older than this banger; recreate the VM to get the current \
                 agent"
                    .into(),
            ),
            AgentError::Guest { .. }
            | AgentError::Poweroff { .. }
            | AgentError::StdinClosed { .. } => None,
        }
    }
}

/// A channel to a guest agent, as the VMM exposes it on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// QEMU's Unix socket behind the `banger.agent` virtio-serial port.
    VirtioSerial { socket: PathBuf },
    /// Firecracker's vsock bridge socket and the agent's vsock port.
    FirecrackerVsock { uds: PathBuf, port: u32 },
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::VirtioSerial { socket } => {
                write!(f, "virtio-serial socket {}", socket.display())
            }
            Endpoint::FirecrackerVsock { uds, port } => {
                write!(f, "Firecracker vsock {} port {port}", uds.display())
            }
        }
    }
}

/// The agent's answer to `hello`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    pub hostname: String,
    pub agent_version: String,
    /// Changes on every guest boot.
    pub boot_id: String,
    pub capabilities: Capabilities,
}

/// What the agent advertised it can do (all false for agents that predate the fields).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// It acknowledges stdin chunks, so stdin is flow-controlled.
    pub stdin_acks: bool,
    /// It runs commands on a terminal and resizes it.
    pub tty: bool,
    /// It runs commands as the image's or the request's user.
    pub users: bool,
    /// It holds a command's output until the host acknowledges it (per-command backpressure).
    pub output_acks: bool,
    /// It takes on a new identity when asked (guests restored from a snapshot).
    pub reidentify: bool,
    /// It unmounts and mounts the work disk when asked (warm snapshots).
    pub work_disk: bool,
}

/// Who a guest restored from a snapshot becomes (see [`AgentClient::reidentify`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Identity {
    /// The `banger.*` settings, as for a kernel command line (address, gateway, host name,
    /// DNS, the host's clock).
    pub boot: crate::cmdline::BootSettings,
    pub mac: String,
    /// 32 lowercase hex digits.
    pub machine_id: String,
    /// Fresh randomness for the guest kernel's pool.
    pub seed: Vec<u8>,
    pub ssh_host_key: Option<crate::protocol::SshHostKey>,
}

impl fmt::Debug for Identity {
    /// Neither the seed nor the private key reach a log.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("boot", &self.boot.to_string())
            .field("mac", &self.mac)
            .field("machine_id", &self.machine_id)
            .finish_non_exhaustive()
    }
}

/// A command to run in the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecRequest {
    /// The program and its arguments; empty runs the user's login shell.
    pub argv: Vec<String>,
    /// Added to the agent's base environment (PATH, HOME=/root, LANG=C.UTF-8).
    pub env: BTreeMap<String, String>,
    /// Defaults to `/root` (or the image's working directory) in the guest.
    pub cwd: Option<String>,
    /// Run on a terminal of this size (stdout and stderr merged) instead of pipes.
    pub tty: Option<WindowSize>,
    /// Run as this user (OCI syntax) instead of the image's default.
    pub user: Option<String>,
}

impl ExecRequest {
    pub fn new<I, S>(argv: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.insert(key.into(), value.into());
        self
    }

    pub fn cwd(mut self, cwd: impl Into<String>) -> Self {
        self.cwd = Some(cwd.into());
        self
    }

    pub fn tty(mut self, size: WindowSize) -> Self {
        self.tty = Some(size);
        self
    }

    pub fn user(mut self, user: impl Into<String>) -> Self {
        self.user = Some(user.into());
        self
    }
}

/// One thing a running command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    Stdout(Bytes),
    Stderr(Bytes),
    /// The command ended; nothing follows.
    Exit(ExitStatus),
}

/// Everything a command printed, and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CollectedOutput {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// Output frames held for one command's consumer before the connection stops being read.
const EXEC_QUEUE: usize = 64;

/// An event for a command's consumer, to be delivered outside the state lock.
type Delivery = (
    RequestId,
    mpsc::Sender<Result<ExecEvent, AgentError>>,
    Result<ExecEvent, AgentError>,
);

enum Pending {
    Hello(oneshot::Sender<Result<Ready, AgentError>>),
    Exec(mpsc::Sender<Result<ExecEvent, AgentError>>),
    Poweroff(oneshot::Sender<Result<(), AgentError>>),
}

impl Pending {
    fn fail(self, err: AgentError) {
        match self {
            Pending::Hello(tx) => drop(tx.send(Err(err))),
            // Full means the consumer is behind; it learns of the end when the sender drops.
            Pending::Exec(tx) => drop(tx.try_send(Err(err))),
            Pending::Poweroff(tx) => drop(tx.send(Err(err))),
        }
    }
}

#[derive(Default)]
struct State {
    pending: HashMap<RequestId, Pending>,
    /// Why the connection ended, once it did.
    lost: Option<String>,
    /// The agent's version and capabilities, once a `ready` told them.
    agent: Option<(String, Capabilities)>,
    /// Per running command: permits to send stdin chunks, one per chunk, returned by its acks
    /// and closed when the command stops reading. Only with an agent that acks.
    credits: HashMap<RequestId, Arc<Semaphore>>,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    // Every critical section is a single map operation; a poisoned lock still holds a
    // consistent map.
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

struct Writer {
    out: Box<dyn AsyncWrite + Send + Unpin>,
    /// Whether the leading newline went out (it ends any half line an earlier host left in a
    /// virtio-serial port, so the agent reads our first frame intact).
    resynced: bool,
}

struct Inner {
    vm: String,
    writer: tokio::sync::Mutex<Writer>,
    state: Shared,
    next_id: AtomicU64,
    reader: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

/// A connection to one guest agent. Cheap to clone; the connection closes when the last clone
/// (and every [`ExecHandle`] made from it) is dropped.
#[derive(Clone)]
pub struct AgentClient {
    inner: Arc<Inner>,
}

impl fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentClient")
            .field("vm", &self.inner.vm)
            .finish_non_exhaustive()
    }
}

impl AgentClient {
    /// Wraps an open stream to the agent. `vm` names the VM in every error. Must be called
    /// within a tokio runtime (it spawns the frame reader).
    pub fn new<S>(vm: impl Into<String>, stream: S) -> Self
    where
        S: AsyncRead + AsyncWrite + Send + 'static,
    {
        let vm = vm.into();
        let (read, write) = tokio::io::split(stream);
        let state = Shared::default();
        let reader = tokio::spawn(read_loop(read, state.clone(), vm.clone()));
        // Ids start from the clock so that a new client does not reuse the ids of an earlier
        // one whose answers may still be in flight on a virtio-serial port.
        let first_id = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(1);
        AgentClient {
            inner: Arc::new(Inner {
                vm,
                writer: tokio::sync::Mutex::new(Writer {
                    out: Box::new(write),
                    resynced: false,
                }),
                state,
                next_id: AtomicU64::new(first_id),
                reader,
            }),
        }
    }

    /// Connects over `endpoint`. Does not wait for the agent: see [`AgentClient::hello`] and
    /// [`wait_ready`].
    pub async fn connect(vm: &str, endpoint: &Endpoint) -> Result<Self, AgentError> {
        match endpoint {
            Endpoint::VirtioSerial { socket } => Self::connect_unix(vm, socket).await,
            Endpoint::FirecrackerVsock { uds, port } => {
                Self::connect_firecracker_vsock(vm, uds, *port).await
            }
        }
    }

    /// Connects to QEMU's Unix socket for the agent's virtio-serial port.
    pub async fn connect_unix(vm: &str, socket: &Path) -> Result<Self, AgentError> {
        let stream = UnixStream::connect(socket)
            .await
            .map_err(|source| AgentError::Connect {
                vm: vm.to_string(),
                endpoint: Endpoint::VirtioSerial {
                    socket: socket.to_path_buf(),
                }
                .to_string(),
                source,
            })?;
        Ok(Self::new(vm, stream))
    }

    /// Connects through Firecracker's vsock bridge at `uds` to the agent's vsock `port`:
    /// `CONNECT <port>\n`, answered by `OK <host port>\n` once the guest accepted.
    pub async fn connect_firecracker_vsock(
        vm: &str,
        uds: &Path,
        port: u32,
    ) -> Result<Self, AgentError> {
        let io_err = |source| AgentError::Connect {
            vm: vm.to_string(),
            endpoint: Endpoint::FirecrackerVsock {
                uds: uds.to_path_buf(),
                port,
            }
            .to_string(),
            source,
        };
        let handshake = async {
            let mut stream = UnixStream::connect(uds).await?;
            stream
                .write_all(format!("CONNECT {port}\n").as_bytes())
                .await?;
            // Byte by byte: whatever follows the newline is the agent's, and a buffered read
            // would swallow it.
            let mut reply = Vec::new();
            let mut byte = [0u8; 1];
            while reply.len() < 128 {
                if tokio::io::AsyncReadExt::read(&mut stream, &mut byte).await? == 0 {
                    break;
                }
                if byte[0] == b'\n' {
                    break;
                }
                reply.push(byte[0]);
            }
            Ok::<_, io::Error>((stream, String::from_utf8_lossy(&reply).into_owned()))
        };
        let (stream, reply) = tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake)
            .await
            .map_err(|_| {
                io_err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "handshake timed out",
                ))
            })?
            .map_err(io_err)?;
        if !reply.starts_with("OK ") {
            return Err(AgentError::VsockRefused {
                vm: vm.to_string(),
                port,
                reply,
            });
        }
        Ok(Self::new(vm, stream))
    }

    /// The VM this client talks to, as named in its errors.
    pub fn vm(&self) -> &str {
        &self.inner.vm
    }

    /// Asks the agent whether it is there; `Ok` means it serves requests.
    pub async fn hello(&self, timeout: Duration) -> Result<Ready, AgentError> {
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::Hello(tx))?;
        self.send(&HostMessage::Hello { id }).await?;
        self.ready_answer(id, rx, timeout).await
    }

    /// Makes a guest restored from a snapshot the VM `identity` describes, and returns its
    /// answer once all of it is in place. Needs an agent that advertised `reidentify`.
    pub async fn reidentify(
        &self,
        identity: Identity,
        timeout: Duration,
    ) -> Result<Ready, AgentError> {
        self.require("take on a new identity (a VM made from a snapshot)", |c| {
            c.reidentify
        })
        .await?;
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::Hello(tx))?;
        self.send(&HostMessage::Reidentify {
            id,
            boot: identity.boot.to_string(),
            mac: identity.mac,
            machine_id: identity.machine_id,
            seed: crate::protocol::Data(identity.seed),
            ssh_host_key: identity.ssh_host_key,
        })
        .await?;
        self.ready_answer(id, rx, timeout).await
    }

    /// Unmounts (`mounted: false`) or mounts (`true`) the guest's work disk at `/root`, and
    /// returns the agent's answer once that is done: unmounted just before a warm snapshot is
    /// taken (so its memory holds nothing of that disk), mounted again right after it, and in
    /// each VM restored from it after [`AgentClient::reidentify`] (its `/dev/vdb` is then its
    /// own disk). Needs an agent that advertised `work_disk`.
    pub async fn work_disk(&self, mounted: bool, timeout: Duration) -> Result<Ready, AgentError> {
        self.require("mount or unmount the work disk (warm snapshots)", |c| {
            c.work_disk
        })
        .await?;
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::Hello(tx))?;
        self.send(&HostMessage::WorkDisk { id, mounted }).await?;
        self.ready_answer(id, rx, timeout).await
    }

    /// Starts a command. Errors the agent reports for it (say, a program that does not exist)
    /// arrive through [`ExecOutput::recv`]. A terminal or another user needs an agent that
    /// advertised them: [`AgentError::Unsupported`] otherwise.
    pub async fn exec(&self, req: ExecRequest) -> Result<ExecHandle, AgentError> {
        if req.tty.is_some() {
            self.require("open a terminal (interactive sessions)", |c| c.tty)
                .await?;
        }
        if req.user.is_some() {
            self.require("run commands as another user", |c| c.users)
                .await?;
        }
        let (tx, rx) = mpsc::channel(EXEC_QUEUE);
        let id = self.register(Pending::Exec(tx))?;
        let (credit, output_acks) = {
            let mut st = lock(&self.inner.state);
            let output_acks = st.agent.as_ref().is_some_and(|(_, c)| c.output_acks);
            let credit = st
                .agent
                .as_ref()
                .is_some_and(|(_, c)| c.stdin_acks)
                .then(|| {
                    let c = Arc::new(Semaphore::new(STDIN_WINDOW));
                    st.credits.insert(id, c.clone());
                    c
                });
            (credit, output_acks)
        };
        self.send(&HostMessage::Exec {
            id,
            argv: req.argv,
            env: req.env,
            cwd: req.cwd,
            tty: req.tty.is_some(),
            rows: req.tty.map(|s| s.rows),
            cols: req.tty.map(|s| s.cols),
            user: req.user,
            output_acks,
        })
        .await?;
        Ok(ExecHandle {
            id,
            input: ExecInput {
                client: self.clone(),
                id,
                credit,
            },
            output: ExecOutput {
                client: self.clone(),
                rx,
                done: false,
                ack: output_acks.then_some(id),
            },
        })
    }

    /// Tells a terminal command its window changed size (ignored for commands without one).
    pub async fn resize(&self, id: RequestId, size: WindowSize) -> Result<(), AgentError> {
        self.send(&HostMessage::Resize {
            id,
            rows: size.rows,
            cols: size.cols,
        })
        .await
    }

    /// Waits up to `timeout` for the `ready` that answers request `id`; a request that gets
    /// none is forgotten, so a late answer is dropped.
    async fn ready_answer(
        &self,
        id: RequestId,
        rx: oneshot::Receiver<Result<Ready, AgentError>>,
        timeout: Duration,
    ) -> Result<Ready, AgentError> {
        match tokio::time::timeout(timeout, rx).await {
            Ok(answer) => answer.unwrap_or_else(|_| Err(self.lost_now())),
            Err(_) => {
                lock(&self.inner.state).pending.remove(&id);
                Err(AgentError::NoAnswer {
                    vm: self.inner.vm.clone(),
                    waited: timeout,
                })
            }
        }
    }

    /// Fails unless the agent advertised what `has` looks for; asks `hello` first when no
    /// `ready` was seen on this connection yet.
    async fn require(
        &self,
        what: &'static str,
        has: impl Fn(&Capabilities) -> bool,
    ) -> Result<(), AgentError> {
        let known = lock(&self.inner.state).agent.clone();
        let (agent_version, caps) = match known {
            Some(known) => known,
            None => {
                let ready = self.hello(CAPABILITY_HELLO).await?;
                (ready.agent_version, ready.capabilities)
            }
        };
        if has(&caps) {
            return Ok(());
        }
        Err(AgentError::Unsupported {
            vm: self.inner.vm.clone(),
            agent_version,
            what,
        })
    }

    /// Asks the guest to power off; returns once the agent started the shutdown (or the
    /// connection dropped, which is what a powered-off guest does).
    pub async fn poweroff(&self) -> Result<(), AgentError> {
        let (tx, rx) = oneshot::channel();
        let id = self.register(Pending::Poweroff(tx))?;
        self.send(&HostMessage::Poweroff { id }).await?;
        rx.await.unwrap_or(Ok(()))
    }

    fn register(&self, pending: Pending) -> Result<RequestId, AgentError> {
        let mut state = lock(&self.inner.state);
        if let Some(reason) = &state.lost {
            return Err(AgentError::ConnectionLost {
                vm: self.inner.vm.clone(),
                reason: reason.clone(),
            });
        }
        let id = RequestId(self.inner.next_id.fetch_add(1, Ordering::Relaxed));
        state.pending.insert(id, pending);
        Ok(id)
    }

    async fn send(&self, msg: &HostMessage) -> Result<(), AgentError> {
        let frame = encode(msg);
        let mut w = self.inner.writer.lock().await;
        let result = async {
            if !w.resynced {
                w.out.write_all(b"\n").await?;
                w.resynced = true;
            }
            w.out.write_all(&frame).await?;
            w.out.flush().await
        }
        .await;
        result.map_err(|e| {
            lock(&self.inner.state).pending.remove(&msg.id());
            AgentError::ConnectionLost {
                vm: self.inner.vm.clone(),
                reason: format!("cannot send to the agent: {e}"),
            }
        })
    }

    fn lost_now(&self) -> AgentError {
        let reason = lock(&self.inner.state)
            .lost
            .clone()
            .unwrap_or_else(|| "the connection closed".to_string());
        AgentError::ConnectionLost {
            vm: self.inner.vm.clone(),
            reason,
        }
    }
}

/// A running command: its input side and its output side, usable from different tasks.
#[derive(Debug)]
pub struct ExecHandle {
    pub id: RequestId,
    pub input: ExecInput,
    pub output: ExecOutput,
}

impl ExecHandle {
    /// Closes stdin and gathers all output until the command ends.
    pub async fn collect(self) -> Result<CollectedOutput, AgentError> {
        self.input.close().await?;
        self.output.collect().await
    }
}

/// Feeds a running command and signals it.
#[derive(Debug, Clone)]
pub struct ExecInput {
    client: AgentClient,
    id: RequestId,
    /// Flow control for stdin (see [`STDIN_WINDOW`]); `None` with agents that do not ack.
    credit: Option<Arc<Semaphore>>,
}

impl ExecInput {
    /// Sends bytes to the command's stdin (in frames of at most 32 KiB). Waits while
    /// [`STDIN_WINDOW`] chunks are unacknowledged, so a command that reads slowly slows the
    /// sender instead of filling the guest; fails once the command no longer reads.
    pub async fn write(&self, data: &[u8]) -> Result<(), AgentError> {
        for chunk in data.chunks(MAX_CHUNK) {
            if let Some(credit) = &self.credit {
                match credit.acquire().await {
                    Ok(permit) => permit.forget(),
                    Err(_) => {
                        return Err(AgentError::StdinClosed {
                            vm: self.client.inner.vm.clone(),
                        })
                    }
                }
            }
            self.client
                .send(&HostMessage::Stdin {
                    id: self.id,
                    data: Data::from(chunk),
                })
                .await?;
        }
        Ok(())
    }

    /// Ends the command's stdin.
    pub async fn close(&self) -> Result<(), AgentError> {
        self.client
            .send(&HostMessage::StdinClose { id: self.id })
            .await
    }

    /// Sends a signal (e.g. `libc::SIGINT`) to the command's process group (for a terminal
    /// command: its foreground process group; SIGHUP hangs the session up).
    pub async fn signal(&self, signal: i32) -> Result<(), AgentError> {
        self.client
            .send(&HostMessage::Signal {
                id: self.id,
                signal,
            })
            .await
    }

    /// Gives a terminal command a new window size (the guest sends it SIGWINCH).
    pub async fn resize(&self, size: WindowSize) -> Result<(), AgentError> {
        self.client.resize(self.id, size).await
    }
}

/// The output of a running command, in the order the guest sent it.
#[derive(Debug)]
pub struct ExecOutput {
    client: AgentClient,
    rx: mpsc::Receiver<Result<ExecEvent, AgentError>>,
    done: bool,
    /// The request to acknowledge each output frame for, when the agent waits for that.
    ack: Option<RequestId>,
}

impl ExecOutput {
    /// The next event; `None` after [`ExecEvent::Exit`] or an error has been returned.
    pub async fn recv(&mut self) -> Option<Result<ExecEvent, AgentError>> {
        if self.done {
            return None;
        }
        let event = self
            .rx
            .recv()
            .await
            .unwrap_or_else(|| Err(self.client.lost_now()));
        let output = matches!(event, Ok(ExecEvent::Stdout(_) | ExecEvent::Stderr(_)));
        self.done = !output;
        if let (true, Some(id)) = (output, self.ack) {
            // Taken by the reader: the agent may send one more. A failure to say so means the
            // connection is gone, which the next event reports.
            let _ = self.client.send(&HostMessage::OutputAck { id }).await;
        }
        Some(event)
    }

    /// Gathers all remaining output until the command ends.
    pub async fn collect(mut self) -> Result<CollectedOutput, AgentError> {
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(event) = self.recv().await {
            match event? {
                ExecEvent::Stdout(b) => stdout.extend_from_slice(&b),
                ExecEvent::Stderr(b) => stderr.extend_from_slice(&b),
                ExecEvent::Exit(status) => {
                    return Ok(CollectedOutput {
                        stdout,
                        stderr,
                        status,
                    })
                }
            }
        }
        Err(self.client.lost_now())
    }
}

/// Connects to `endpoint` and says `hello` until the agent answers or `timeout` passed. The
/// socket may not exist yet and the VMM may refuse connections while the guest boots; both
/// are retried.
pub async fn wait_ready(
    vm: &str,
    endpoint: &Endpoint,
    timeout: Duration,
) -> Result<(AgentClient, Ready), AgentError> {
    wait_ready_with(vm, timeout, || AgentClient::connect(vm, endpoint)).await
}

/// [`wait_ready`] with any way of connecting: `connect` is called for each attempt (wrap a
/// stream from elsewhere with [`AgentClient::new`]). Once connected, `hello` is repeated on the
/// same connection, since an agent that is not running yet answers the frames waiting for it
/// when it starts.
pub async fn wait_ready_with<F, Fut, E>(
    vm: &str,
    timeout: Duration,
    mut connect: F,
) -> Result<(AgentClient, Ready), AgentError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<AgentClient, E>>,
    E: std::error::Error,
{
    let deadline = Instant::now() + timeout;
    let mut last = "no attempt finished".to_string();
    let not_ready = |last: String| AgentError::NotReady {
        vm: vm.to_string(),
        waited: timeout,
        last,
    };
    loop {
        let remaining = deadline.saturating_duration_since(Instant::now());
        if remaining.is_zero() {
            return Err(not_ready(last));
        }
        match tokio::time::timeout(remaining, connect()).await {
            Err(_) => {
                return Err(not_ready(format!(
                    "connecting took too long; before: {last}"
                )))
            }
            Ok(Err(e)) => last = report(&e),
            Ok(Ok(client)) => loop {
                let remaining = deadline.saturating_duration_since(Instant::now());
                if remaining.is_zero() {
                    return Err(not_ready(last));
                }
                match client.hello(remaining.min(HELLO_RETRY)).await {
                    Ok(ready) => return Ok((client, ready)),
                    Err(AgentError::NoAnswer { .. }) => {
                        last = "connected, but the agent has not answered yet".to_string();
                    }
                    Err(e) => {
                        last = report(&e);
                        break;
                    }
                }
            },
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(remaining.min(RECONNECT_PAUSE)).await;
    }
}

async fn read_loop<R: AsyncRead + Send + Unpin>(read: R, state: Shared, vm: String) {
    let mut reader = BufReader::with_capacity(64 * 1024, read);
    let mut line = Vec::new();
    let reason = loop {
        line.clear();
        match read_frame(&mut reader, &mut line).await {
            Ok(Frame::Eof) => break "the agent closed the connection".to_string(),
            Err(e) => break format!("reading from the agent failed: {e}"),
            Ok(Frame::TooLong) => continue,
            Ok(Frame::Line) if is_blank(&line) => continue,
            Ok(Frame::Line) => {}
        }
        // A frame that does not parse is most likely the tail of one sent to an earlier host
        // connection; skipping it is all there is to do.
        if let Ok(msg) = decode::<GuestMessage>(&line) {
            if let Some((id, tx, event)) = dispatch(&state, &vm, msg) {
                // Waits while the command's consumer is behind: the stream stops being read,
                // the guest's writes block, and so does the command. Memory stays bounded
                // whatever the guest sends. A consumer that is gone ends the request.
                if tx.send(event).await.is_err() {
                    lock(&state).pending.remove(&id);
                }
            }
        }
    };
    let mut st = lock(&state);
    st.lost = Some(reason.clone());
    for (_, credit) in st.credits.drain() {
        credit.close();
    }
    for (_, pending) in st.pending.drain() {
        match pending {
            // The guest going away is what a poweroff asks for.
            Pending::Poweroff(tx) => drop(tx.send(Ok(()))),
            other => other.fail(AgentError::ConnectionLost {
                vm: vm.clone(),
                reason: reason.clone(),
            }),
        }
    }
}

/// Settles `msg` against the request it answers. Output for a running command comes back to be
/// delivered by the caller, outside the lock, where it may wait.
fn dispatch(state: &Mutex<State>, vm: &str, msg: GuestMessage) -> Option<Delivery> {
    let id = msg.id();
    let mut st = lock(state);
    match &msg {
        GuestMessage::StdinAck { closed, .. } => {
            if let Some(credit) = st.credits.get(&id) {
                if *closed {
                    credit.close();
                } else {
                    credit.add_permits(1);
                }
            }
            return None;
        }
        GuestMessage::Exit { .. } | GuestMessage::Error { .. } => {
            if let Some(credit) = st.credits.remove(&id) {
                credit.close();
            }
        }
        GuestMessage::Ready {
            agent_version,
            stdin_acks,
            tty,
            users,
            output_acks,
            reidentify,
            work_disk,
            ..
        } => {
            st.agent = Some((
                agent_version.clone(),
                Capabilities {
                    stdin_acks: *stdin_acks,
                    tty: *tty,
                    users: *users,
                    output_acks: *output_acks,
                    reidentify: *reidentify,
                    work_disk: *work_disk,
                },
            ))
        }
        _ => {}
    }
    let pending = st.pending.remove(&id)?;
    match (pending, msg) {
        (
            Pending::Hello(tx),
            GuestMessage::Ready {
                hostname,
                agent_version,
                boot_id,
                stdin_acks,
                tty,
                users,
                output_acks,
                reidentify,
                work_disk,
                ..
            },
        ) => drop(tx.send(Ok(Ready {
            hostname,
            agent_version,
            boot_id,
            capabilities: Capabilities {
                stdin_acks,
                tty,
                users,
                output_acks,
                reidentify,
                work_disk,
            },
        }))),
        // The queue bounds frames, so each frame must be bounded too: the agent never sends
        // more than MAX_CHUNK; a guest that does ends its command, and the frame is not kept.
        (
            Pending::Exec(tx),
            GuestMessage::Stdout { data, .. } | GuestMessage::Stderr { data, .. },
        ) if data.0.len() > MAX_CHUNK => {
            let message = format!(
                "the agent sent an output frame of {} bytes (at most {MAX_CHUNK}); the command's \
                 output was cut off there",
                data.0.len()
            );
            let vm = vm.to_string();
            return Some((id, tx, Err(AgentError::Guest { vm, message })));
        }
        (Pending::Exec(tx), GuestMessage::Stdout { data, .. }) => {
            st.pending.insert(id, Pending::Exec(tx.clone()));
            return Some((id, tx, Ok(ExecEvent::Stdout(Bytes::from(data.0)))));
        }
        (Pending::Exec(tx), GuestMessage::Stderr { data, .. }) => {
            st.pending.insert(id, Pending::Exec(tx.clone()));
            return Some((id, tx, Ok(ExecEvent::Stderr(Bytes::from(data.0)))));
        }
        (Pending::Exec(tx), GuestMessage::Exit { code, signal, .. }) => {
            return Some((
                id,
                tx,
                Ok(ExecEvent::Exit(ExitStatus::from_wire(code, signal))),
            ));
        }
        (Pending::Poweroff(tx), GuestMessage::Exit { code, signal, .. }) => {
            let status = ExitStatus::from_wire(code, signal);
            drop(tx.send(if status.success() {
                Ok(())
            } else {
                Err(AgentError::Poweroff {
                    vm: vm.to_string(),
                    reason: status.to_string(),
                })
            }))
        }
        (Pending::Poweroff(tx), GuestMessage::Error { message, .. }) => {
            drop(tx.send(Err(AgentError::Poweroff {
                vm: vm.to_string(),
                reason: message,
            })))
        }
        (pending, GuestMessage::Error { message, .. }) => pending.fail(AgentError::Guest {
            vm: vm.to_string(),
            message,
        }),
        // An answer of the wrong kind for this request: a confused peer; keep waiting for the
        // right one.
        (pending, _) => {
            st.pending.insert(id, pending);
        }
    }
    None
}

/// Reads one line into `buf` (see [`LineAssembler`]).
async fn read_frame<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    buf: &mut Vec<u8>,
) -> io::Result<Frame> {
    let mut assembler = LineAssembler::default();
    loop {
        let available = reader.fill_buf().await?;
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
