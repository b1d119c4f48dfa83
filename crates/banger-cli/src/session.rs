//! Sessions through the guest agent: `vm exec`, and `vm ssh` on guests without sshd. Renders
//! the daemon's exec stream (stdout and stderr as they come, then the exit status), forwards
//! stdin as it arrives, and passes Ctrl-C on.
//!
//! With a terminal (`tty`) the guest runs the command on a pseudo-terminal and this side acts
//! as its screen and keyboard: the local terminal goes into raw mode ([`RawMode`], restored on
//! every way out: normal end, error, panic, SIGTERM/SIGHUP), every byte typed goes to the guest
//! unchanged (Ctrl-C and Ctrl-D are bytes there, turned into SIGINT and end-of-file by the
//! guest's terminal), window changes (SIGWINCH) are sent as resizes, and the remote exit status
//! (128+signal when killed) becomes ours. Which sessions get a terminal is the caller's choice.

use std::io::{IsTerminal, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::process::ExitCode;

use banger_api::vm::{ExecEvent, ExecRequest, ExecResize, ExecSignal};
use http_body_util::BodyExt;
use hyper::Method;
use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

use crate::client::Client;
use crate::exit::{CliError, Exit};

/// What to run and how.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Session {
    /// The program and its arguments; empty for the user's login shell.
    pub argv: Vec<String>,
    /// Forward this process's stdin to the command.
    pub stdin: bool,
    /// Run the command on a terminal in the guest.
    pub tty: bool,
    /// Run as this user (OCI syntax) instead of the image's.
    pub user: Option<String>,
    /// Working directory in the guest (default: the image's WorkingDir, else /root).
    pub cwd: Option<String>,
}

/// The local terminal in raw mode for as long as this lives: no line editing, no echo, no
/// signals from keys, no output processing, so the guest's terminal does all of that. Dropping
/// it (however the session ends, panics included) puts back the settings it found.
pub struct RawMode<F: AsFd> {
    fd: F,
    saved: Termios,
}

impl<F: AsFd> RawMode<F> {
    /// Puts the terminal on `fd` into raw mode.
    pub fn enable(fd: F) -> nix::Result<Self> {
        let saved = tcgetattr(&fd)?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        // TCSADRAIN: what was already written is shown with the old settings.
        tcsetattr(&fd, SetArg::TCSADRAIN, &raw)?;
        Ok(RawMode { fd, saved })
    }
}

impl<F: AsFd> Drop for RawMode<F> {
    fn drop(&mut self) {
        // Nothing better to do if it fails: the terminal is gone or was taken over.
        let _ = tcsetattr(&self.fd, SetArg::TCSADRAIN, &self.saved);
    }
}

/// The window size of the terminal on `fd`, if it is one.
pub fn window_size(fd: impl AsFd) -> Option<ExecResize> {
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one `winsize` into our stack variable and nothing else.
    let rc = unsafe { libc::ioctl(fd.as_fd().as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (rc == 0 && ws.ws_row > 0 && ws.ws_col > 0).then_some(ExecResize {
        rows: ws.ws_row,
        cols: ws.ws_col,
    })
}

/// The size of whichever of stdin and stdout is a terminal.
fn local_window_size() -> Option<ExecResize> {
    window_size(std::io::stdin()).or_else(|| window_size(std::io::stdout()))
}

/// Runs `session` in VM `name` through the daemon and returns the command's exit status.
pub async fn run(client: &Client, name: &str, session: Session) -> Result<ExitCode, CliError> {
    run_with_input(client, name, session, None)
        .await
        .map(ExitCode::from)
}

/// [`run`], with the command's stdin read from `input` instead of this process's stdin (for
/// streams banger makes itself, like a workspace tar), returning the exit status as a number.
pub async fn run_with_input(
    client: &Client,
    name: &str,
    session: Session,
    input: Option<Box<dyn std::io::Read + Send>>,
) -> Result<u8, CliError> {
    let mut input = input;
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let size = session.tty.then(local_window_size).flatten();
    let mut env = Vec::new();
    if session.tty {
        // The guest's programs draw for the terminal this one is.
        if let Some(term) = std::env::var("TERM").ok().filter(|t| !t.is_empty()) {
            env.push(("TERM".to_string(), term));
        }
    }
    let req = ExecRequest {
        argv: session.argv,
        cwd: session.cwd,
        env,
        stdin: session.stdin || input.is_some(),
        tty: session.tty,
        rows: size.map(|s| s.rows),
        cols: size.map(|s| s.cols),
        user: session.user,
    };
    let signals = |kind: SignalKind, what: &str| {
        signal(kind).map_err(|e| CliError::new(Exit::Failure, format!("cannot handle {what}: {e}")))
    };
    let mut interrupt = signals(SignalKind::interrupt(), "Ctrl-C")?;
    let mut winch = signals(SignalKind::window_change(), "window changes")?;
    let mut terminate = signals(SignalKind::terminate(), "SIGTERM")?;
    let mut hangup = signals(SignalKind::hangup(), "SIGHUP")?;
    let (size_tx, size_rx) = watch::channel(size);

    let mut body = client
        .post_stream(&format!("/v1/vms/{name}/exec"), &req)
        .await?;
    // From here until this function returns, the terminal is the guest's.
    let stdin = std::io::stdin();
    let _raw = if session.tty && stdin.is_terminal() {
        Some(RawMode::enable(stdin).map_err(|e| {
            CliError::new(
                Exit::Failure,
                format!("cannot put the terminal into raw mode: {e}"),
            )
        })?)
    } else {
        None
    };

    let mut buf = Vec::new();
    let mut started: Option<String> = None;
    let mut interrupts = 0;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = interrupt.recv() => {
                interrupts += 1;
                match (&started, interrupts) {
                    (Some(id), 1) => {
                        // Off this loop, so output keeps flowing and a second Ctrl-C is seen
                        // even if the daemon is slow to answer.
                        let path = format!("/v1/vms/{name}/exec/{id}/signal");
                        let c = client.clone();
                        tokio::spawn(async move {
                            let sig = ExecSignal { signal: libc::SIGINT };
                            let _: Result<serde_json::Value, _> =
                                c.call(Method::POST, &path, Some(&sig)).await;
                        });
                    }
                    _ => return Ok(130),
                }
                continue;
            }
            _ = winch.recv() => {
                if session.tty {
                    if let Some(size) = local_window_size() {
                        size_tx.send_replace(Some(size));
                    }
                }
                continue;
            }
            // Leaving closes the exec stream, and the daemon hangs the command up.
            _ = terminate.recv() => return Ok(128 + libc::SIGTERM as u8),
            _ = hangup.recv() => return Ok(128 + libc::SIGHUP as u8),
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            CliError::new(Exit::DaemonUnreachable, format!("exec stream broke: {e}"))
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let ev: ExecEvent = serde_json::from_slice(&line)
                .map_err(|e| CliError::new(Exit::Failure, format!("bad exec event: {e}")))?;
            match ev {
                ExecEvent::Started { session: id } => {
                    let path = format!("/v1/vms/{name}/exec/{id}/stdin");
                    match input.take() {
                        Some(reader) => upload(client.clone(), path, reader),
                        None if session.stdin => {
                            upload(client.clone(), path, Box::new(std::io::stdin()))
                        }
                        None => {}
                    }
                    if session.tty {
                        forward_resizes(
                            client.clone(),
                            format!("/v1/vms/{name}/exec/{id}/resize"),
                            size,
                            size_rx.clone(),
                        );
                    }
                    started = Some(id);
                }
                ExecEvent::Stdout { data } => {
                    let _ = stdout.write_all(&b64.decode(data).unwrap_or_default());
                    let _ = stdout.flush();
                }
                ExecEvent::Stderr { data } => {
                    let _ = stderr.write_all(&b64.decode(data).unwrap_or_default());
                }
                ExecEvent::Exit { code } => {
                    return Ok(u8::try_from(code.clamp(0, 255)).unwrap_or(255))
                }
                ExecEvent::Failed { error } => return Err(CliError::from_api(error)),
            }
        }
    }
    Err(CliError::new(
        Exit::DaemonUnreachable,
        "bangerd closed the exec stream before the command ended",
    ))
}

/// Copies `input` (this process's stdin, or a stream banger makes) to the command, in the
/// background, until EOF. A blocking thread reads (stdin may be a terminal, a file, a pipe or a
/// socket) and hands over whatever one read returned, so typed keys go out at once; the upload
/// streams them as they come. Failures are left to the exec stream to report: if the command
/// ended, its stdin no longer matters.
fn upload(client: Client, path: String, mut input: Box<dyn std::io::Read + Send>) {
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match input.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(bytes::Bytes::copy_from_slice(&buf[..n]))
                        .is_err()
                    {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    });
    tokio::spawn(async move {
        let _: Result<serde_json::Value, _> = client.post_chunks(&path, rx).await;
    });
}

/// Sends each new window size, one call at a time and only the latest, so a burst of SIGWINCH
/// while a window is dragged ends with the size it ended at. `sent` is the size the exec
/// request carried: a change between the request and now is sent at once. A failed call is not
/// worth breaking the session for (the picture is only mis-sized); it is dropped.
fn forward_resizes(
    client: Client,
    path: String,
    sent: Option<ExecResize>,
    mut sizes: watch::Receiver<Option<ExecResize>>,
) {
    tokio::spawn(async move {
        let mut last = sent;
        loop {
            let now = *sizes.borrow_and_update();
            if let Some(size) = now.filter(|_| now != last) {
                let _: Result<serde_json::Value, _> =
                    client.call(Method::POST, &path, Some(&size)).await;
                last = now;
            }
            if sizes.changed().await.is_err() {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use nix::pty::openpty;
    use nix::sys::termios::{LocalFlags, OutputFlags};

    fn assert_cooked(t: &Termios) {
        assert!(t
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG));
        assert!(t.output_flags.contains(OutputFlags::OPOST));
    }

    #[test]
    fn raw_mode_is_raw_while_it_lives_and_the_terminal_is_as_before_afterwards() {
        let pty = openpty(None, None).unwrap();
        let before = tcgetattr(&pty.slave).unwrap();
        assert_cooked(&before);
        {
            let _raw = RawMode::enable(&pty.slave).unwrap();
            let during = tcgetattr(&pty.slave).unwrap();
            assert!(!during
                .local_flags
                .intersects(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG));
            assert!(!during.output_flags.contains(OutputFlags::OPOST));
        }
        assert_eq!(tcgetattr(&pty.slave).unwrap(), before);
    }

    #[test]
    fn raw_mode_is_undone_when_the_session_panics() {
        let pty = openpty(None, None).unwrap();
        let before = tcgetattr(&pty.slave).unwrap();
        let slave = &pty.slave;
        let result = std::panic::catch_unwind(|| {
            let _raw = RawMode::enable(slave).unwrap();
            panic!("the session broke");
        });
        assert!(result.is_err());
        assert_eq!(tcgetattr(&pty.slave).unwrap(), before);
    }

    #[test]
    fn raw_mode_is_undone_when_the_session_returns_an_error() {
        fn session(fd: &std::os::fd::OwnedFd) -> Result<(), String> {
            let _raw = RawMode::enable(fd).map_err(|e| e.to_string())?;
            Err("the daemon went away".into())
        }
        let pty = openpty(None, None).unwrap();
        let before = tcgetattr(&pty.slave).unwrap();
        assert!(session(&pty.slave).is_err());
        assert_eq!(tcgetattr(&pty.slave).unwrap(), before);
    }

    #[test]
    fn raw_mode_needs_a_terminal() {
        let file = tempfile::tempfile().unwrap();
        assert!(RawMode::enable(&file).is_err());
        assert_eq!(window_size(&file), None);
    }

    #[test]
    fn the_window_size_is_read_from_the_terminal() {
        let ws = libc::winsize {
            ws_row: 42,
            ws_col: 137,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = openpty(Some(&ws), None).unwrap();
        assert_eq!(
            window_size(&pty.slave),
            Some(ExecResize {
                rows: 42,
                cols: 137
            })
        );
    }
}
