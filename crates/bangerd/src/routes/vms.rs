//! HTTP handlers for `/v1/vms`: request decoding and response shapes only; behaviour lives in
//! [`crate::vms`]. Exec answers with newline-delimited `ExecEvent`s, logs with raw console bytes.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use banger_api::vm::{
    CreateVmRequest, DeleteVmQuery, ExecEvent, ExecRequest, ExecResize, ExecSignal, SshTarget,
    StopVmRequest, VmInfo, VmState,
};
use banger_api::Deleted;

use crate::console_log::ConsoleReader;
use crate::server::{stream, ApiResult, AppError};
use crate::Shared;

pub async fn list(State(s): Shared) -> ApiResult<Vec<VmInfo>> {
    Ok(Json(s.vms.list().await?))
}

pub async fn show(State(s): Shared, UrlPath(name): UrlPath<String>) -> ApiResult<VmInfo> {
    Ok(Json(s.vms.show(&name).await?))
}

pub async fn create(State(s): Shared, Json(req): Json<CreateVmRequest>) -> Response {
    stream(move |e| async move { s.vms.create(req, e).await })
}

pub async fn start(State(s): Shared, UrlPath(name): UrlPath<String>) -> Response {
    stream(move |e| async move { s.vms.start(&name, e).await })
}

pub async fn restart(State(s): Shared, UrlPath(name): UrlPath<String>) -> Response {
    stream(move |e| async move { s.vms.restart(&name, e).await })
}

pub async fn stop(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<StopVmRequest>,
) -> ApiResult<VmInfo> {
    Ok(Json(s.vms.stop(&name, req.force).await?))
}

pub async fn delete(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<DeleteVmQuery>,
) -> ApiResult<Deleted> {
    Ok(Json(s.vms.delete(&name, q.force).await?))
}

pub async fn ssh(State(s): Shared, UrlPath(name): UrlPath<String>) -> ApiResult<SshTarget> {
    Ok(Json(s.vms.ssh_target(&name).await?))
}

pub async fn exec(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<ExecRequest>,
) -> Response {
    // Bounded: while the client does not read, the command's output waits in the guest.
    let (tx, rx) = tokio::sync::mpsc::channel::<ExecEvent>(crate::vms::EXEC_EVENTS_IN_FLIGHT);
    tokio::spawn(async move {
        if let Err(error) = s.vms.exec(&name, req, tx.clone()).await {
            let _ = tx.send(ExecEvent::Failed { error }).await;
        }
    });
    crate::server::ndjson_bounded(rx)
}

pub async fn exec_stdin(
    State(s): Shared,
    UrlPath((name, session)): UrlPath<(String, String)>,
    body: Body,
) -> ApiResult<serde_json::Value> {
    let bytes = s.vms.exec_stdin(&name, &session, body).await?;
    Ok(Json(serde_json::json!({ "bytes": bytes })))
}

pub async fn exec_signal(
    State(s): Shared,
    UrlPath((name, session)): UrlPath<(String, String)>,
    Json(req): Json<ExecSignal>,
) -> ApiResult<serde_json::Value> {
    s.vms.exec_signal(&name, &session, req.signal).await?;
    Ok(Json(serde_json::json!({ "signal": req.signal })))
}

/// `POST /v1/vms/{name}/exec/{session}/resize`
pub async fn exec_resize(
    State(s): Shared,
    UrlPath((name, session)): UrlPath<(String, String)>,
    Json(req): Json<ExecResize>,
) -> ApiResult<ExecResize> {
    s.vms.exec_resize(&name, &session, req).await?;
    Ok(Json(req))
}

#[derive(serde::Deserialize)]
pub struct LogsQuery {
    #[serde(default)]
    follow: bool,
}

/// The console log: `console.log.1` (the older half, see [`crate::console_log`]) then
/// `console.log`, streamed in chunks; with `follow`, new output as it is written, until the VM
/// stops.
pub async fn logs(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
    Query(q): Query<LogsQuery>,
) -> Result<Response, AppError> {
    let info = s.vms.show(&name).await?;
    let reader = ConsoleReader::open(std::path::PathBuf::from(&info.console_log))
        .await
        .map_err(|e| {
            AppError(banger_api::ApiError::new(
                banger_api::ErrorCode::Internal,
                format!("{e:#}"),
            ))
        })?;
    struct Tail {
        reader: ConsoleReader,
        follow: bool,
        state: std::sync::Arc<crate::AppState>,
        name: String,
    }
    let tail = Tail {
        reader,
        follow: q.follow,
        state: s.clone(),
        name,
    };
    let body = futures_util::stream::unfold(tail, |mut t| async move {
        loop {
            if let Some(chunk) = t.reader.next_chunk().await {
                return Some((Ok::<_, std::io::Error>(chunk), t));
            }
            if !t.follow {
                return None;
            }
            let running = t
                .state
                .vms
                .show(&t.name)
                .await
                .map(|i| {
                    matches!(
                        i.state,
                        VmState::Running | VmState::Creating | VmState::Stopping
                    )
                })
                .unwrap_or(false);
            if !running {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    Ok((
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        Body::from_stream(body),
    )
        .into_response())
}

/// `POST /v1/vms/{name}/snapshot`
pub async fn snapshot(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<banger_api::snapshot::CreateSnapshotRequest>,
) -> ApiResult<banger_api::snapshot::SnapshotInfo> {
    Ok(Json(s.vms.snapshot(&name, req.name).await?))
}

/// `GET /v1/snapshots`
pub async fn list_snapshots(
    State(s): Shared,
) -> ApiResult<Vec<banger_api::snapshot::SnapshotInfo>> {
    Ok(Json(s.vms.list_snapshots().await?))
}

/// `DELETE /v1/snapshots/{name}`
pub async fn delete_snapshot(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<Deleted> {
    Ok(Json(s.vms.delete_snapshot(&name).await?))
}

/// `POST /v1/vms/{name}/fork` (streamed)
pub async fn fork(
    State(s): Shared,
    UrlPath(name): UrlPath<String>,
    Json(req): Json<banger_api::vm::ForkVmRequest>,
) -> Response {
    stream(move |e| async move { s.vms.fork(&name, req.count, e).await })
}
