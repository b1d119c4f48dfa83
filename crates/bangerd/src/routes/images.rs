//! HTTP handlers for `/v1/images` and `/v1/kernels`: request decoding and response shapes
//! only; behaviour lives in [`crate::images`]. Builds, pulls, exports and registrations answer
//! with event streams, everything else with JSON.

use axum::extract::{Path as UrlPath, State};
use axum::response::Response;
use axum::Json;
use banger_api::{
    BuildImageRequest, Deleted, ExportImageRequest, ImageInfo, KernelInfo, Pruned,
    PullImageRequest, PullKernelRequest, RegisterImageRequest, RegisterKernelRequest,
};

use crate::server::{stream, ApiResult, AppError};
use crate::Shared;

pub async fn list(State(s): Shared) -> ApiResult<Vec<ImageInfo>> {
    Ok(Json(s.images.list().await?))
}

pub async fn list_kernels(State(s): Shared) -> ApiResult<Vec<KernelInfo>> {
    Ok(Json(s.images.kernels().await?))
}

pub async fn build(State(s): Shared, Json(req): Json<BuildImageRequest>) -> Response {
    stream(move |e| async move { s.images.build(req, e).await })
}

pub async fn pull(State(s): Shared, Json(req): Json<PullImageRequest>) -> Response {
    stream(move |e| async move { s.images.pull(req, e).await })
}

pub async fn pull_kernel(State(s): Shared, Json(req): Json<PullKernelRequest>) -> Response {
    stream(move |e| async move { s.images.pull_kernel(req, e).await })
}

pub async fn export(State(s): Shared, Json(req): Json<ExportImageRequest>) -> Response {
    stream(move |e| async move { s.images.export(req, e).await })
}

pub async fn register(State(s): Shared, Json(req): Json<RegisterImageRequest>) -> Response {
    stream(move |e| async move { s.images.register(req, e).await })
}

pub async fn show(State(s): Shared, UrlPath(name): UrlPath<String>) -> ApiResult<ImageInfo> {
    let (img, _) = s.images.get(&name).await.map_err(AppError)?;
    Ok(Json(img))
}

pub async fn prune(State(s): Shared) -> ApiResult<Pruned> {
    Ok(Json(s.images.prune().await.map_err(AppError)?))
}

pub async fn delete(State(s): Shared, UrlPath(name): UrlPath<String>) -> ApiResult<Deleted> {
    Ok(Json(s.images.delete(&name).await.map_err(AppError)?))
}

pub async fn register_kernel(
    State(s): Shared,
    Json(req): Json<RegisterKernelRequest>,
) -> ApiResult<KernelInfo> {
    Ok(Json(s.images.register_kernel(req).await.map_err(AppError)?))
}

pub async fn delete_kernel(State(s): Shared, UrlPath(name): UrlPath<String>) -> ApiResult<Deleted> {
    Ok(Json(s.images.delete_kernel(&name).await.map_err(AppError)?))
}
