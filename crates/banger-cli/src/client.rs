//! The CLI's connection to `bangerd`: finding it, starting it, and calling its API.
//!
//! Every command goes through [`Client::connect`], which starts the daemon detached when nothing
//! answers on the socket (or only a stale socket file is left after a crash), waits until it
//! answers, and checks that it speaks our API version. Requests are HTTP/1.1 over the Unix
//! socket; long operations come back as newline-delimited [`Event`]s that [`Client::stream`]
//! hands to a callback one by one.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use banger_api::{ApiError, ErrorCode, Event, VersionInfo, API_VERSION, API_VERSION_HEADER};
use banger_config::Paths;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::net::UnixStream;

use crate::exit::{CliError, Exit};

/// How long a freshly started daemon has to answer.
const START_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone)]
pub struct Client {
    socket: PathBuf,
}

impl Client {
    /// The socket this CLI talks to: `BANGER_SOCKET` if set, else the one from the XDG paths.
    pub fn socket_path(paths: &Paths) -> PathBuf {
        std::env::var_os("BANGER_SOCKET")
            .map(PathBuf::from)
            .unwrap_or_else(|| paths.socket())
    }

    /// A client for a daemon that must already be running (no auto-start, no version check).
    pub fn existing(paths: &Paths) -> Self {
        Self {
            socket: Self::socket_path(paths),
        }
    }

    /// Connects to the daemon, starting it if needed, and checks its API version.
    pub async fn connect(paths: &Paths) -> Result<Self, CliError> {
        let client = Self::existing(paths);
        let info = match client.version().await {
            Ok(info) => info,
            Err(Probe::NotRunning) if autostart_allowed() => {
                start_daemon(paths)?;
                client.wait_until_up(paths).await?
            }
            Err(Probe::NotRunning) => {
                return Err(CliError::new(
                    Exit::DaemonUnreachable,
                    format!("bangerd is not running at {}", client.socket.display()),
                )
                .hint("unset BANGER_NO_AUTOSTART or run `banger daemon status`"))
            }
            Err(Probe::Failed(e)) => return Err(e),
        };
        if info.api_version != API_VERSION {
            return Err(CliError::new(
                Exit::DaemonUnreachable,
                format!(
                    "bangerd (pid {}, version {}) speaks API version {} but this banger speaks {}",
                    info.pid, info.daemon_version, info.api_version, API_VERSION
                ),
            )
            .hint("run `banger daemon restart` to start a daemon that matches this banger"));
        }
        Ok(client)
    }

    async fn wait_until_up(&self, paths: &Paths) -> Result<VersionInfo, CliError> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            match self.version().await {
                Ok(info) => return Ok(info),
                Err(Probe::Failed(e)) => return Err(e),
                Err(Probe::NotRunning) if Instant::now() > deadline => {
                    return Err(CliError::new(
                        Exit::DaemonUnreachable,
                        format!(
                            "started bangerd but it did not answer on {} within {}s",
                            self.socket.display(),
                            START_TIMEOUT.as_secs()
                        ),
                    )
                    .hint(format!("read its log: {}", paths.daemon_log().display())));
                }
                Err(Probe::NotRunning) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// Asks the daemon who it is; distinguishes "nothing there" from real failures.
    pub async fn version(&self) -> Result<VersionInfo, Probe> {
        match self.send(Method::GET, "/v1/version", None).await {
            Ok((status, body)) => decode(status, &body).map_err(Probe::Failed),
            Err(e) if is_not_running(&e) => Err(Probe::NotRunning),
            Err(e) => Err(Probe::Failed(self.io_error(e))),
        }
    }

    fn io_error(&self, e: std::io::Error) -> CliError {
        let hint = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "the socket belongs to another user; each user runs their own bangerd"
        } else {
            "run `banger daemon restart`"
        };
        CliError::new(
            Exit::DaemonUnreachable,
            format!("cannot talk to bangerd at {}: {e}", self.socket.display()),
        )
        .hint(hint)
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> std::io::Result<(StatusCode, Bytes)> {
        let resp = self.open(method, path, body).await?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(std::io::Error::other)?
            .to_bytes();
        Ok((status, body))
    }

    async fn open(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> std::io::Result<hyper::Response<hyper::body::Incoming>> {
        self.open_with(
            method,
            path,
            Full::new(Bytes::from(body.unwrap_or_default())),
        )
        .await
    }

    async fn open_with<B>(
        &self,
        method: Method,
        path: &str,
        body: B,
    ) -> std::io::Result<hyper::Response<hyper::body::Incoming>>
    where
        B: hyper::body::Body<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let stream = UnixStream::connect(&self.socket).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(std::io::Error::other)?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(format!("http://bangerd{path}"))
            .header("host", "bangerd")
            .header(API_VERSION_HEADER, API_VERSION.to_string())
            .header("content-type", "application/json")
            .body(body)
            .map_err(std::io::Error::other)?;
        sender
            .send_request(req)
            .await
            .map_err(std::io::Error::other)
    }

    /// A POST whose body is whatever arrives on `chunks` until the channel closes (sent as it
    /// comes, chunked), answered with JSON.
    pub async fn post_chunks<T: DeserializeOwned>(
        &self,
        path: &str,
        chunks: tokio::sync::mpsc::Receiver<Bytes>,
    ) -> Result<T, CliError> {
        let stream = tokio_stream_from(chunks);
        let body = http_body_util::StreamBody::new(stream);
        let resp = self
            .open_with(Method::POST, path, body)
            .await
            .map_err(|e| self.io_error(e))?;
        let status = resp.status();
        let bytes = self.body_bytes(resp).await?;
        decode(status, &bytes)
    }

    /// A whole (short) response body.
    async fn body_bytes(
        &self,
        resp: hyper::Response<hyper::body::Incoming>,
    ) -> Result<Bytes, CliError> {
        Ok(resp
            .into_body()
            .collect()
            .await
            .map_err(|e| self.io_error(std::io::Error::other(e)))?
            .to_bytes())
    }

    /// A JSON call.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, CliError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot encode request: {e}")))?;
        let (status, bytes) = self
            .send(method, path, body)
            .await
            .map_err(|e| self.io_error(e))?;
        decode(status, &bytes)
    }

    /// A GET whose body is streamed raw to the caller (errors decoded as usual).
    pub async fn get_stream(&self, path: &str) -> Result<hyper::body::Incoming, CliError> {
        self.raw(Method::GET, path, None).await
    }

    /// A POST whose body is streamed raw to the caller (errors decoded as usual).
    pub async fn post_stream(
        &self,
        path: &str,
        body: &impl Serialize,
    ) -> Result<hyper::body::Incoming, CliError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot encode request: {e}")))?;
        self.raw(Method::POST, path, Some(body)).await
    }

    async fn raw(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<hyper::body::Incoming, CliError> {
        let resp = self
            .open(method, path, body)
            .await
            .map_err(|e| self.io_error(e))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp.into_body());
        }
        let bytes = self.body_bytes(resp).await?;
        decode::<serde_json::Value>(status, &bytes).and_then(|_| {
            Err(CliError::new(
                Exit::Failure,
                format!("unexpected answer {status} from bangerd"),
            ))
        })
    }

    /// A streamed call: `on_event` sees every event; the result of `done` is returned.
    pub async fn stream<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &impl Serialize,
        mut on_event: impl FnMut(&Event),
    ) -> Result<T, CliError> {
        let body = serde_json::to_vec(body)
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot encode request: {e}")))?;
        let resp = self
            .open(Method::POST, path, Some(body))
            .await
            .map_err(|e| self.io_error(e))?;
        let status = resp.status();
        let mut body = resp.into_body();
        if !status.is_success() {
            let bytes = body
                .collect()
                .await
                .map_err(|e| self.io_error(std::io::Error::other(e)))?
                .to_bytes();
            return decode(status, &bytes);
        }
        let mut buf: Vec<u8> = Vec::new();
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.io_error(std::io::Error::other(e)))?;
            let Some(data) = frame.data_ref() else {
                continue;
            };
            buf.extend_from_slice(data);
            while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = buf.drain(..=pos).collect();
                let event: Event = serde_json::from_slice(&line).map_err(|e| {
                    CliError::new(Exit::Failure, format!("bad event from bangerd: {e}"))
                })?;
                match event {
                    Event::Done { result } => {
                        return serde_json::from_value(result).map_err(|e| {
                            CliError::new(Exit::Failure, format!("bad result from bangerd: {e}"))
                        })
                    }
                    Event::Failed { error } => return Err(CliError::from_api(error)),
                    other => on_event(&other),
                }
            }
        }
        Err(CliError::new(
            Exit::DaemonUnreachable,
            "bangerd closed the connection before the operation finished",
        )
        .hint("the daemon may have crashed; see `banger daemon status` and its log"))
    }
}

/// Outcome of probing the socket.
pub enum Probe {
    NotRunning,
    Failed(CliError),
}

fn is_not_running(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

fn autostart_allowed() -> bool {
    std::env::var_os("BANGER_NO_AUTOSTART").is_none()
}

fn decode<T: DeserializeOwned>(status: StatusCode, body: &[u8]) -> Result<T, CliError> {
    if status.is_success() {
        return serde_json::from_slice(body).map_err(|e| {
            CliError::new(
                Exit::Failure,
                format!("unexpected answer from bangerd: {e}"),
            )
        });
    }
    match serde_json::from_slice::<ApiError>(body) {
        Ok(api) => Err(CliError::from_api(api)),
        Err(_) => Err(CliError::from_api(ApiError::new(
            ErrorCode::Internal,
            format!(
                "bangerd answered {status}: {}",
                String::from_utf8_lossy(body).trim()
            ),
        ))),
    }
}

/// The daemon binary: `BANGER_DAEMON_BIN`, else `bangerd` next to this executable, else PATH.
pub fn daemon_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("BANGER_DAEMON_BIN") {
        return PathBuf::from(bin);
    }
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("bangerd")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("bangerd"))
}

/// Starts `bangerd` detached from this process (own session, output to its log).
pub fn start_daemon(paths: &Paths) -> Result<(), CliError> {
    let log_path = paths.daemon_log();
    let open_log = |p: &Path| -> std::io::Result<std::fs::File> {
        if let Some(dir) = p.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
    };
    let log = open_log(&log_path).map_err(|e| {
        CliError::new(
            Exit::DaemonUnreachable,
            format!("cannot open daemon log {}: {e}", log_path.display()),
        )
    })?;
    let log2 = log.try_clone().map_err(|e| {
        CliError::new(
            Exit::DaemonUnreachable,
            format!("cannot open daemon log: {e}"),
        )
    })?;
    let bin = daemon_binary();
    let mut cmd = std::process::Command::new(&bin);
    cmd.stdin(Stdio::null()).stdout(log).stderr(log2);
    // SAFETY: setsid is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(|e| {
        CliError::new(
            Exit::DaemonUnreachable,
            format!("cannot start the daemon {}: {e}", bin.display()),
        )
        .hint("install banger with `make install`, or set BANGER_DAEMON_BIN to bangerd's path")
    })?;
    // The daemon outlives us; reap it in a thread in case it exits early (lock taken by another).
    std::thread::spawn(move || {
        let mut child = child;
        let _ = child.wait();
    });
    Ok(())
}

/// The chunks of a channel as body frames.
fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Bytes>,
) -> impl futures_util::Stream<Item = Result<hyper::body::Frame<Bytes>, std::convert::Infallible>>
       + Send
       + 'static {
    futures_util::stream::poll_fn(move |cx| {
        rx.poll_recv(cx)
            .map(|c| c.map(|b| Ok(hyper::body::Frame::data(b))))
    })
}

/// Percent-encodes one URL path segment (an image name may be an OCI reference with `/`, `:`
/// and `@`), leaving only unreserved characters as they are.
pub fn path_segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod path_tests {
    use super::path_segment;

    #[test]
    fn references_become_one_path_segment() {
        assert_eq!(path_segment("alpine-3-20"), "alpine-3-20");
        assert_eq!(
            path_segment("127.0.0.1:5000/a/b@sha256:ff"),
            "127.0.0.1%3A5000%2Fa%2Fb%40sha256%3Aff"
        );
    }
}
