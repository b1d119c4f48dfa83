//! Setup step 7: telling systemd the agent is ready (`Type=notify`), without libsystemd.
//!
//! The protocol is one datagram, `READY=1`, sent to the Unix socket named by `$NOTIFY_SOCKET`
//! (a path, or an abstract name when it starts with `@`). Units that sshd and the rest order
//! themselves after start once it arrives, so it is sent after the per-boot setup and before
//! serving the channel.

use std::io;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

/// The variable systemd sets for `Type=notify` services.
pub const NOTIFY_SOCKET_ENV: &str = "NOTIFY_SOCKET";

#[derive(Debug, thiserror::Error)]
#[error("cannot notify systemd through {socket}")]
pub struct NotifyError {
    socket: String,
    #[source]
    source: io::Error,
}

/// Sends `READY=1` to `$NOTIFY_SOCKET`. Returns `false` when the variable is unset (the agent
/// was not started by systemd, which is fine).
pub fn notify_ready() -> Result<bool, NotifyError> {
    match std::env::var(NOTIFY_SOCKET_ENV) {
        Ok(socket) if !socket.is_empty() => notify(&socket, "READY=1").map(|()| true),
        _ => Ok(false),
    }
}

/// Sends one notification `message` to `socket` (a path or `@abstract-name`).
pub fn notify(socket: &str, message: &str) -> Result<(), NotifyError> {
    let fail = |source| NotifyError {
        socket: socket.to_string(),
        source,
    };
    let addr = match socket.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(socket),
    }
    .map_err(fail)?;
    let sock = UnixDatagram::unbound().map_err(fail)?;
    sock.send_to_addr(message.as_bytes(), &addr).map_err(fail)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_reaches_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let listener = UnixDatagram::bind(&path).unwrap();
        notify(path.to_str().unwrap(), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn ready_reaches_an_abstract_socket() {
        let name = format!("banger-agent-test-notify-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        notify(&format!("@{name}"), "READY=1").unwrap();
        let mut buf = [0u8; 64];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
    }

    #[test]
    fn a_missing_socket_is_an_error_naming_it() {
        let err = notify("/nonexistent/notify.sock", "READY=1").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/notify.sock"));
    }
}
