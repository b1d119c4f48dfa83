//! HTTP plumbing of the API: version gate, error mapping and event streams.
//!
//! Handlers return `Result<Json<T>, AppError>` for quick calls, or [`stream`] for long ones. An
//! operation learns that its client went away through [`Emitter::client_gone`]: the response
//! body holds the receiving end of the event channel, and hyper drops the body when it reads the
//! end of a connection mid-response (a killed CLI). The version gate refuses any request whose
//! `x-banger-api-version` differs from ours, except the two calls a mismatched CLI needs to
//! recover (`GET /v1/version` and `POST /v1/daemon/stop`). What each route does lives in the
//! service modules; this module knows only HTTP.

use std::future::Future;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use banger_api::{ApiError, ErrorCode, Event, API_VERSION, API_VERSION_HEADER};
use tokio::sync::mpsc;

/// An API error on its way to the client.
#[derive(Debug)]
pub struct AppError(pub ApiError);

impl From<ApiError> for AppError {
    fn from(e: ApiError) -> Self {
        Self(e)
    }
}

impl From<anyhow::Error> for AppError {
    fn from(e: anyhow::Error) -> Self {
        Self(internal(e))
    }
}

/// Turns an unexpected error into an `internal` API error carrying the whole cause chain and
/// the hints of its errors.
pub fn internal(e: anyhow::Error) -> ApiError {
    match e.downcast::<ApiError>() {
        Ok(api) => api,
        Err(e) => crate::hints::api_error(ErrorCode::Internal, crate::hints::report(e.as_ref()))
            .with_hint(
                "this is a bug in banger or a problem on the host; the daemon log has details",
            ),
    }
}

/// Whether an I/O error anywhere in `e`'s chain is a full disk (ENOSPC).
pub fn is_disk_full(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err
            .downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// An I/O failure while writing banger's files (the store, a VM's disks); a full disk gets its
/// own code and a hint, anything else is [`internal`].
pub fn disk_error(e: anyhow::Error, what: &str) -> ApiError {
    if is_disk_full(e.as_ref()) {
        crate::hints::failed(ErrorCode::DiskFull, what, e.as_ref())
            .with_hint("the disk holding ~/.local/state/banger is full; free some space and retry")
    } else {
        internal(e.context(what.to_owned()))
    }
}

pub fn status_for(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::ApiVersionMismatch => StatusCode::PRECONDITION_FAILED,
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::AlreadyExists | ErrorCode::InUse | ErrorCode::InvalidState => {
            StatusCode::CONFLICT
        }
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        (status_for(self.0.code), Json(self.0)).into_response()
    }
}

pub type ApiResult<T> = Result<Json<T>, AppError>;

/// Refuses requests from a CLI that speaks another API version.
pub async fn version_gate(req: Request, next: Next) -> Response {
    let exempt = matches!(req.uri().path(), "/v1/version" | "/v1/daemon/stop");
    let theirs = req
        .headers()
        .get(API_VERSION_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u32>().ok());
    if exempt || theirs == Some(API_VERSION) {
        return next.run(req).await;
    }
    let theirs = theirs.map_or_else(|| "none".to_owned(), |v| v.to_string());
    AppError(
        ApiError::new(
            ErrorCode::ApiVersionMismatch,
            format!(
                "bangerd speaks API version {API_VERSION} but the client sent version {theirs}"
            ),
        )
        .with_hint("run `banger daemon restart` so the daemon matches this banger"),
    )
    .into_response()
}

/// Sends events of one streamed operation to its client.
#[derive(Clone)]
pub struct Emitter {
    tx: mpsc::UnboundedSender<Event>,
    /// False for a sink, whose receiver is gone from the start without a client leaving.
    has_client: bool,
}

impl Emitter {
    pub fn emit(&self, event: Event) {
        // A client that went away does not stop the operation by itself: half-made state is
        // worse. An operation that can stop cleanly (a build) watches `client_gone`.
        let _ = self.tx.send(event);
    }

    /// Resolves once the client is gone: its connection closed and the response body, which
    /// holds the receiving end, was dropped. Never resolves for a [`Emitter::sink`].
    pub async fn client_gone(&self) {
        if self.has_client {
            self.tx.closed().await;
        } else {
            std::future::pending::<()>().await;
        }
    }

    /// An emitter whose events a test reads.
    #[cfg(test)]
    pub fn channel() -> (Self, mpsc::UnboundedReceiver<Event>) {
        let (tx, rx) = mpsc::unbounded_channel();
        (
            Self {
                tx,
                has_client: true,
            },
            rx,
        )
    }

    /// An emitter that drops everything (for internal callers).
    pub fn sink() -> Self {
        let (tx, _rx) = mpsc::unbounded_channel();
        Self {
            tx,
            has_client: false,
        }
    }
}

impl banger_image::Progress for Emitter {
    fn phase(&self, name: &str) {
        self.emit(Event::Phase { name: name.into() });
    }
    fn bytes(&self, done: u64, total: Option<u64>) {
        self.emit(Event::Progress {
            done,
            total,
            item: None,
        });
    }
    fn item(&self, id: &str, done: u64, total: Option<u64>) {
        self.emit(Event::Progress {
            done,
            total,
            item: Some(id.into()),
        });
    }
    fn log(&self, line: &str) {
        self.emit(Event::Log { line: line.into() });
    }
    fn notice(&self, msg: &str) {
        self.emit(Event::Notice {
            message: msg.into(),
        });
    }
}

/// Runs `op` in its own task and streams its events, ending with `done` or `failed`. The task is
/// not cancelled when the client leaves (that would drop the operation at any await, half-way
/// through a rename or a transaction); `op` watches [`Emitter::client_gone`] where it can stop.
pub fn stream<F, Fut, T>(op: F) -> Response
where
    F: FnOnce(Emitter) -> Fut,
    Fut: Future<Output = Result<T, ApiError>> + Send + 'static,
    T: serde::Serialize,
{
    let (tx, rx) = mpsc::unbounded_channel();
    let emitter = Emitter {
        tx: tx.clone(),
        has_client: true,
    };
    let fut = op(emitter);
    tokio::spawn(async move {
        let last = match fut.await {
            Ok(v) => match serde_json::to_value(v) {
                Ok(result) => Event::Done { result },
                Err(e) => Event::Failed {
                    error: ApiError::new(ErrorCode::Internal, format!("cannot encode result: {e}")),
                },
            },
            Err(error) => {
                tracing::warn!(code = ?error.code, "operation failed: {}", error.message);
                Event::Failed { error }
            }
        };
        let _ = tx.send(last);
    });
    ndjson_response(rx)
}

/// A streamed response of one JSON line per item received, ending when every sender is gone.
pub fn ndjson_response<T: serde::Serialize + Send + 'static>(
    rx: mpsc::UnboundedReceiver<T>,
) -> Response {
    ndjson_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        Some((rx.recv().await?, rx))
    }))
}

/// [`ndjson_response`] from a bounded channel: its sender waits while the client does not read,
/// so a command's output backs up to the guest instead of piling up in the daemon.
pub fn ndjson_bounded<T: serde::Serialize + Send + 'static>(rx: mpsc::Receiver<T>) -> Response {
    ndjson_stream(futures_util::stream::unfold(rx, |mut rx| async move {
        Some((rx.recv().await?, rx))
    }))
}

fn ndjson_stream<T: serde::Serialize + Send + 'static>(
    items: impl futures_util::Stream<Item = T> + Send + 'static,
) -> Response {
    use futures_util::StreamExt;
    let body = items.map(|item| {
        let mut line = serde_json::to_vec(&item).unwrap_or_default();
        line.push(b'\n');
        Ok::<_, std::convert::Infallible>(bytes::Bytes::from(line))
    });
    Response::builder()
        .header(header::CONTENT_TYPE, banger_api::EVENT_STREAM_CONTENT_TYPE)
        .body(Body::from_stream(body))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_gets_its_own_code_and_anything_else_is_internal() {
        let full = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::ENOSPC))
            .context("cannot write /x/root.ext4");
        let e = disk_error(full, "cannot clone the image");
        assert_eq!(e.code, ErrorCode::DiskFull);
        assert!(e
            .message
            .starts_with("cannot clone the image: cannot write /x/root.ext4"));
        assert_eq!(e.hints.len(), 1, "{:?}", e.hints);
        assert!(e.hints[0].contains("free some space"), "{:?}", e.hints);

        let other = anyhow::Error::from(std::io::Error::from_raw_os_error(libc::EIO));
        let e = disk_error(other, "cannot clone the image");
        assert_eq!(e.code, ErrorCode::Internal);
        assert!(
            e.message.starts_with("cannot clone the image: "),
            "{}",
            e.message
        );
    }

    #[tokio::test]
    async fn an_operation_learns_that_its_client_went_away_and_a_sink_never_does() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let (gone_tx, mut gone) = mpsc::unbounded_channel::<()>();
        let app = axum::Router::new().route(
            "/op",
            axum::routing::post(move || {
                let gone_tx = gone_tx.clone();
                async move {
                    stream(move |e| async move {
                        e.emit(Event::Phase {
                            name: "started".into(),
                        });
                        e.client_gone().await;
                        let _ = gone_tx.send(());
                        Ok::<_, ApiError>(())
                    })
                }
            }),
        );
        let sock = dir.path().join("api.sock");
        let listener = tokio::net::UnixListener::bind(&sock).unwrap();
        let server = tokio::spawn(async move { axum::serve(listener, app).await });

        let mut client = tokio::net::UnixStream::connect(&sock).await.unwrap();
        client
            .write_all(b"POST /op HTTP/1.1\r\nhost: banger\r\ncontent-length: 0\r\n\r\n")
            .await
            .unwrap();
        let mut seen = Vec::new();
        while !String::from_utf8_lossy(&seen).contains("started") {
            let mut buf = [0u8; 1024];
            let n = client.read(&mut buf).await.unwrap();
            assert!(n > 0, "{}", String::from_utf8_lossy(&seen));
            seen.extend_from_slice(&buf[..n]);
        }
        // Connected and quiet is not gone.
        let early = tokio::time::timeout(std::time::Duration::from_millis(300), gone.recv()).await;
        assert!(early.is_err(), "gone while the client was still there");
        drop(client);
        tokio::time::timeout(std::time::Duration::from_secs(5), gone.recv())
            .await
            .expect("the operation never learnt that its client left")
            .unwrap();
        server.abort();

        let sink = Emitter::sink();
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(100), sink.client_gone()).await;
        assert!(waited.is_err(), "a sink has no client to lose");
    }

    #[test]
    fn an_internal_error_keeps_the_hints_of_its_chain() {
        let tool = banger_image::MissingTool {
            bin: "debugfs".into(),
            package: "e2fsprogs".into(),
        };
        let e = internal(anyhow::Error::new(tool).context("cannot write the agent into the disk"));
        assert_eq!(e.code, ErrorCode::Internal);
        assert_eq!(
            e.message,
            "cannot write the agent into the disk: required host tool `debugfs` was not found in \
             $PATH or the sbin directories"
        );
        assert_eq!(e.hints[0], "apt-get install e2fsprogs");
        assert!(e.hints[1].contains("daemon log"), "{:?}", e.hints);
    }
}
