//! A minimal QMP (QEMU Machine Protocol) client: just enough to know QEMU is up, to ask the
//! guest to power down, and to save and load a VM's state through a file descriptor.
//!
//! The protocol: on connect QEMU sends a greeting `{"QMP": {...}}`; the client must send
//! `{"execute": "qmp_capabilities"}` and get `{"return": {}}` before any other command. Every
//! message is one JSON object per line. Asynchronous events (`{"event": ...}`) may arrive at
//! any time, including between a command and its reply, and are skipped here. A reply is
//! either `{"return": ...}` or `{"error": {"class": ..., "desc": ...}}`.
//!
//! File descriptors travel as `SCM_RIGHTS` ancillary data on the line of a `getfd` command, which
//! names the descriptor inside QEMU; a migration URI `fd:NAME` then uses it. That is how state
//! reaches a file while QEMU runs under `-sandbox ...,spawn=deny` (no `exec:`) and has no `file:`
//! migration (QEMU 7.2).

use std::io::IoSlice;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
use tokio::io::Interest;

use serde_json::{json, Value};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("cannot connect to QMP socket {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP socket I/O failed")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("no QMP reply within {0:?}")]
    Timeout(Duration),
    #[error("QEMU sent something that is not QMP: {0}")]
    Protocol(String),
    #[error("QEMU refused {command}: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

const REPLY_TIMEOUT: Duration = Duration::from_secs(5);

/// A QMP session past the capabilities handshake.
pub struct Qmp {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    reply_timeout: Duration,
}

impl Qmp {
    /// Connects and completes the handshake.
    pub async fn connect(path: &Path) -> Result<Qmp, QmpError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| QmpError::Connect {
                path: path.to_path_buf(),
                source,
            })?;
        let (r, w) = stream.into_split();
        let mut qmp = Qmp {
            reader: BufReader::new(r),
            writer: w,
            reply_timeout: REPLY_TIMEOUT,
        };
        let greeting = qmp.read_message().await?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// How long each reply may take from now on. A QEMU loading a state from a file answers
    /// only once the load is done: its main loop reads the whole file in one go.
    pub fn set_reply_timeout(&mut self, timeout: Duration) {
        self.reply_timeout = timeout;
    }

    /// Runs one command and returns its `return` value.
    pub async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, QmpError> {
        let line = command_line(command, arguments);
        self.writer.write_all(line.as_bytes()).await?;
        self.reply(command).await
    }

    /// Hands `fd` to QEMU under `name` (`getfd`), for a later `fd:NAME` migration URI. QEMU
    /// keeps its own copy; the caller may close `fd` afterwards.
    pub async fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        let line = command_line("getfd", Some(json!({ "fdname": name })));
        let bytes = line.as_bytes();
        let stream = self.writer.as_ref();
        let fds = [fd.as_raw_fd()];
        // The descriptor rides on the first byte sent; a short write sends the rest plainly.
        let sent = loop {
            stream.writable().await?;
            let attempt = stream.try_io(Interest::WRITABLE, || {
                sendmsg::<UnixAddr>(
                    stream.as_raw_fd(),
                    &[IoSlice::new(bytes)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map_err(std::io::Error::from)
            });
            match attempt {
                Ok(n) => break n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        };
        self.writer.write_all(&bytes[sent..]).await?;
        self.reply("getfd").await.map(|_| ())
    }

    /// Waits for the reply to `command`, skipping events.
    async fn reply(&mut self, command: &str) -> Result<Value, QmpError> {
        loop {
            let reply = self.read_message().await?;
            if reply.get("event").is_some() {
                continue;
            }
            if let Some(ret) = reply.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = reply.get("error") {
                let field = |k: &str| err.get(k).and_then(Value::as_str).unwrap_or("").to_string();
                return Err(QmpError::Command {
                    command: command.to_string(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(reply.to_string()));
        }
    }

    async fn read_message(&mut self) -> Result<Value, QmpError> {
        let mut line = String::new();
        let n = tokio::time::timeout(self.reply_timeout, self.reader.read_line(&mut line))
            .await
            .map_err(|_| QmpError::Timeout(self.reply_timeout))??;
        if n == 0 {
            return Err(QmpError::Closed);
        }
        serde_json::from_str(line.trim_end())
            .map_err(|e| QmpError::Protocol(format!("{e}: {line:?}")))
    }
}

/// One command as the line QMP reads.
fn command_line(command: &str, arguments: Option<Value>) -> String {
    let mut msg = json!({ "execute": command });
    if let Some(args) = arguments {
        msg["arguments"] = args;
    }
    let mut line = msg.to_string();
    line.push('\n');
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;
    use tokio::net::UnixListener;

    /// A scripted QMP server: sends the greeting, then answers each received line with the next
    /// scripted reply lines. Returns the lines it received.
    fn serve(path: &Path, replies: Vec<Vec<&'static str>>) -> tokio::task::JoinHandle<Vec<String>> {
        let listener = UnixListener::bind(path).unwrap();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let (r, mut w) = s.into_split();
            let mut r = BufReader::new(r);
            w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\r\n")
                .await
                .unwrap();
            let mut got = Vec::new();
            for reply in replies {
                let mut line = String::new();
                if r.read_line(&mut line).await.unwrap() == 0 {
                    break;
                }
                got.push(line.trim_end().to_string());
                for l in reply {
                    w.write_all(format!("{l}\r\n").as_bytes()).await.unwrap();
                }
            }
            got
        })
    }

    #[tokio::test]
    async fn handshake_then_command_skipping_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let server = serve(
            &path,
            vec![
                vec![r#"{"return": {}}"#],
                vec![
                    r#"{"timestamp": {"seconds": 1, "microseconds": 2}, "event": "POWERDOWN"}"#,
                    r#"{"return": {}}"#,
                ],
            ],
        );
        let mut qmp = Qmp::connect(&path).await.unwrap();
        assert_eq!(
            qmp.execute("system_powerdown", None).await.unwrap(),
            json!({})
        );
        let got = server.await.unwrap();
        assert_eq!(
            got,
            vec![
                r#"{"execute":"qmp_capabilities"}"#,
                r#"{"execute":"system_powerdown"}"#
            ]
        );
    }

    #[tokio::test]
    async fn command_error_carries_class_and_description() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let _server = serve(
            &path,
            vec![
                vec![r#"{"return": {}}"#],
                vec![
                    r#"{"error": {"class": "CommandNotFound", "desc": "The command nope has not been found"}}"#,
                ],
            ],
        );
        let mut qmp = Qmp::connect(&path).await.unwrap();
        let err = qmp.execute("nope", None).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "QEMU refused nope: CommandNotFound: The command nope has not been found"
        );
    }

    #[tokio::test]
    async fn send_fd_hands_the_descriptor_over_with_the_getfd_line() {
        use nix::sys::socket::{recvmsg, ControlMessageOwned};
        use std::io::{BufRead, IoSliceMut, Write};
        use std::os::fd::{FromRawFd, OwnedFd};

        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        // A QEMU stand-in: greeting, capabilities, then one message read with recvmsg; it
        // writes into the descriptor it received.
        let server = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"{\"QMP\": {}}\r\n").unwrap();
            let mut line = String::new();
            std::io::BufReader::new(s.try_clone().unwrap())
                .read_line(&mut line)
                .unwrap();
            s.write_all(b"{\"return\": {}}\r\n").unwrap();
            let mut buf = [0u8; 256];
            let mut cmsg = nix::cmsg_space!([std::os::fd::RawFd; 1]);
            let (n, fds) = {
                let mut iov = [IoSliceMut::new(&mut buf)];
                let msg =
                    recvmsg::<()>(s.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::empty())
                        .unwrap();
                let fds: Vec<_> = msg
                    .cmsgs()
                    .unwrap()
                    .flat_map(|c| match c {
                        ControlMessageOwned::ScmRights(fds) => fds,
                        _ => Vec::new(),
                    })
                    .collect();
                (msg.bytes, fds)
            };
            assert_eq!(fds.len(), 1, "no descriptor arrived");
            // SAFETY: the kernel just installed this descriptor for us.
            let mut f = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fds[0]) });
            f.write_all(b"written by QEMU").unwrap();
            s.write_all(b"{\"return\": {}}\r\n").unwrap();
            String::from_utf8_lossy(&buf[..n]).into_owned()
        });
        let target = dir.path().join("state");
        let file = std::fs::File::create(&target).unwrap();
        let mut qmp = Qmp::connect(&path).await.unwrap();
        qmp.send_fd("banger-state", file.as_fd()).await.unwrap();
        let line = server.join().unwrap();
        assert_eq!(
            line,
            "{\"arguments\":{\"fdname\":\"banger-state\"},\"execute\":\"getfd\"}\n"
        );
        assert_eq!(std::fs::read(&target).unwrap(), b"written by QEMU");
    }

    #[tokio::test]
    async fn connect_to_missing_socket_names_it() {
        let err = Qmp::connect(Path::new("/nonexistent/qmp.sock"))
            .await
            .err()
            .unwrap();
        assert!(err.to_string().contains("/nonexistent/qmp.sock"), "{err}");
    }
}
