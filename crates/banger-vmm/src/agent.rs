//! Opening a byte stream to the guest agent over whichever channel the backend gave the VM
//! ([`AgentEndpoint`]). What flows over the stream is the agent protocol's business, not ours.
//!
//! Firecracker's vsock is a Unix socket on the host: a host-initiated connection writes
//! `CONNECT <port>\n` and Firecracker answers `OK <host-side port>\n` once the guest accepted,
//! after which the socket carries the guest connection's bytes. QEMU without vhost-vsock gives
//! the agent a virtio-serial port whose host side is a listening Unix socket (one client at a
//! time). With vhost-vsock the host uses an `AF_VSOCK` socket to the guest's CID.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use nix::sys::socket::{self, AddressFamily, SockFlag, SockType, VsockAddr};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncWrite, AsyncWriteExt, BufReader, ReadBuf};
use tokio::net::UnixStream;

use crate::{AgentEndpoint, VmmError};

/// The vsock port the guest agent listens on.
pub const AGENT_PORT: u32 = 1024;
/// Name of the virtio-serial port for the agent; the guest sees `/dev/virtio-ports/<name>`.
pub const AGENT_SERIAL_PORT_NAME: &str = "banger.agent";

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// A connected stream to the guest agent.
#[derive(Debug)]
pub enum AgentStream {
    Unix(UnixStream),
    Vsock(VsockStream),
}

impl std::fmt::Display for AgentEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AgentEndpoint::VirtioSerial { socket } => {
                write!(f, "virtio-serial socket {}", socket.display())
            }
            AgentEndpoint::FirecrackerVsock { uds, port } => {
                write!(f, "Firecracker vsock {} port {port}", uds.display())
            }
            AgentEndpoint::Vsock { cid, port } => write!(f, "vsock cid {cid} port {port}"),
        }
    }
}

/// Connects to the agent. Fails fast (a few seconds at most); callers waiting for the guest to
/// come up retry.
pub async fn connect_agent(endpoint: &AgentEndpoint) -> Result<AgentStream, VmmError> {
    let fail = |source| VmmError::AgentConnect {
        endpoint: endpoint.to_string(),
        source,
    };
    let timed = |r: Result<io::Result<AgentStream>, tokio::time::error::Elapsed>| {
        r.unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "timed out")))
    };
    match endpoint {
        AgentEndpoint::VirtioSerial { socket } => {
            let r = tokio::time::timeout(CONNECT_TIMEOUT, async {
                Ok(AgentStream::Unix(UnixStream::connect(socket).await?))
            })
            .await;
            timed(r).map_err(fail)
        }
        AgentEndpoint::Vsock { cid, port } => {
            let r = tokio::time::timeout(CONNECT_TIMEOUT, async {
                Ok(AgentStream::Vsock(VsockStream::connect(*cid, *port).await?))
            })
            .await;
            timed(r).map_err(fail)
        }
        AgentEndpoint::FirecrackerVsock { uds, port } => {
            let r = tokio::time::timeout(CONNECT_TIMEOUT, firecracker_connect(uds, *port)).await;
            match r {
                Err(_) => Err(fail(io::Error::new(io::ErrorKind::TimedOut, "timed out"))),
                Ok(Err(HandshakeError::Io(e))) => Err(fail(e)),
                Ok(Err(HandshakeError::Refused(reply))) => Err(VmmError::AgentHandshake {
                    endpoint: endpoint.to_string(),
                    reply,
                }),
                Ok(Ok(s)) => Ok(AgentStream::Unix(s)),
            }
        }
    }
}

enum HandshakeError {
    Io(io::Error),
    Refused(String),
}

async fn firecracker_connect(uds: &Path, port: u32) -> Result<UnixStream, HandshakeError> {
    let mut stream = UnixStream::connect(uds).await.map_err(HandshakeError::Io)?;
    stream
        .write_all(format!("CONNECT {port}\n").as_bytes())
        .await
        .map_err(HandshakeError::Io)?;
    // Read the reply byte by byte: anything after the newline already belongs to the agent,
    // so a buffered reader must not swallow it.
    let mut reply = Vec::new();
    let mut reader = BufReader::with_capacity(1, &mut stream);
    reader
        .read_until(b'\n', &mut reply)
        .await
        .map_err(HandshakeError::Io)?;
    let reply = String::from_utf8_lossy(&reply).trim_end().to_string();
    if reply.starts_with("OK ") {
        Ok(stream)
    } else {
        Err(HandshakeError::Refused(reply))
    }
}

/// A non-blocking `AF_VSOCK` stream socket on the tokio reactor.
#[derive(Debug)]
pub struct VsockStream {
    fd: AsyncFd<OwnedFd>,
}

impl VsockStream {
    pub async fn connect(cid: u32, port: u32) -> io::Result<Self> {
        let fd = socket::socket(
            AddressFamily::Vsock,
            SockType::Stream,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            None,
        )?;
        let addr = VsockAddr::new(cid, port);
        let pending = match socket::connect(fd.as_raw_fd(), &addr) {
            Ok(()) => false,
            Err(nix::errno::Errno::EINPROGRESS) => true,
            Err(e) => return Err(e.into()),
        };
        // SAFETY: `fd` is an open socket we own; the AsyncFd takes ownership of the OwnedFd, so
        // it stays open and is the same descriptor until the AsyncFd is dropped.
        let fd = unsafe { AsyncFd::register(fd)? };
        if pending {
            let mut guard = fd.writable().await?;
            guard.clear_ready();
            let err = socket::getsockopt(fd.get_ref(), socket::sockopt::SocketError)?;
            if err != 0 {
                return Err(io::Error::from_raw_os_error(err));
            }
        }
        Ok(VsockStream { fd })
    }
}

impl AsyncRead for VsockStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        loop {
            let mut guard = ready!(self.fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            match guard.try_io(|fd| Ok(nix::unistd::read(fd.get_ref(), unfilled)?)) {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for VsockStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            let mut guard = ready!(self.fd.poll_write_ready(cx))?;
            match guard.try_io(|fd| Ok(nix::unistd::write(fd.get_ref(), data)?)) {
                Ok(r) => return Poll::Ready(r),
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(
            socket::shutdown(self.fd.get_ref().as_raw_fd(), socket::Shutdown::Write)
                .map_err(io::Error::from),
        )
    }
}

impl AsyncRead for AgentStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
            AgentStream::Vsock(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for AgentStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_write(cx, data),
            AgentStream::Vsock(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_flush(cx),
            AgentStream::Vsock(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            AgentStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
            AgentStream::Vsock(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio::net::UnixListener;

    /// A fake Firecracker vsock bridge: answers CONNECT with `reply`, then sends "hello".
    async fn fake_bridge(path: &Path, reply: &'static str) -> tokio::task::JoinHandle<String> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut line = Vec::new();
            let mut b = [0u8; 1];
            while b[0] != b'\n' {
                s.read_exact(&mut b).await.unwrap();
                line.push(b[0]);
            }
            // Reply and first agent bytes in one write: the client must not eat the latter.
            s.write_all(format!("{reply}hello").as_bytes())
                .await
                .unwrap();
            String::from_utf8(line).unwrap()
        })
    }

    #[tokio::test]
    async fn firecracker_vsock_handshake_sends_connect_and_keeps_following_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let server = fake_bridge(&uds, "OK 1073741824\n").await;
        let ep = AgentEndpoint::FirecrackerVsock {
            uds: uds.clone(),
            port: AGENT_PORT,
        };
        let mut stream = connect_agent(&ep).await.unwrap();
        let mut got = [0u8; 5];
        stream.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"hello");
        assert_eq!(server.await.unwrap(), "CONNECT 1024\n");
    }

    #[tokio::test]
    async fn firecracker_vsock_refusal_is_reported_with_the_reply() {
        let dir = tempfile::tempdir().unwrap();
        let uds = dir.path().join("v.sock");
        let _server = fake_bridge(&uds, "FAILURE\n").await;
        let ep = AgentEndpoint::FirecrackerVsock { uds, port: 1024 };
        let err = connect_agent(&ep).await.unwrap_err();
        assert!(err.to_string().contains("\"FAILURE\""), "{}", err.report());
    }

    #[tokio::test]
    async fn missing_virtio_serial_socket_names_the_endpoint() {
        let ep = AgentEndpoint::VirtioSerial {
            socket: "/nonexistent/agent.sock".into(),
        };
        let err = connect_agent(&ep).await.unwrap_err();
        let msg = err.report();
        assert!(msg.contains("/nonexistent/agent.sock"), "{msg}");
        assert!(msg.contains("hint:"), "{msg}");
    }

    #[tokio::test]
    async fn vsock_connect_failure_is_an_error_not_a_hang() {
        // CID 1 is the local loopback CID: nothing leaves this machine. No test can listen
        // there on this host (no vsock_loopback), so only the failure path is exercised.
        let ep = AgentEndpoint::Vsock { cid: 1, port: 5 };
        let err = connect_agent(&ep).await.unwrap_err();
        assert!(
            err.to_string().contains("vsock cid 1 port 5"),
            "{}",
            err.report()
        );
    }
}
