//! `bangerd`, the banger daemon: owns all state, images, networking and VM processes, and serves
//! the API of `banger-api` on a private Unix socket. The binary is a thin wrapper around
//! [`daemon::run`]; services live in their own modules and reach each other through [`AppState`].

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use banger_api::VersionInfo;
use banger_config::Paths;

pub mod console_log;
pub mod daemon;
pub mod dns;
pub mod egress;
pub mod fsutil;
pub mod hints;
pub mod image_locks;
pub mod images;
pub mod names;
pub mod registry;
pub mod routes;
pub mod server;
pub mod sshkeys;
pub mod store;
pub mod vmdisk;
pub mod vms;

/// Everything a request handler may need.
pub struct AppState {
    pub paths: Paths,
    pub images: images::Images,
    pub vms: Arc<vms::Vms>,
    pub stop: tokio::sync::watch::Sender<bool>,
}

pub type Shared = State<Arc<AppState>>;

async fn version(State(state): Shared) -> Json<VersionInfo> {
    Json(VersionInfo {
        api_version: banger_api::API_VERSION,
        daemon_version: env!("CARGO_PKG_VERSION").to_owned(),
        pid: std::process::id(),
        socket: state.paths.socket().display().to_string(),
        state_dir: state.paths.state_dir.display().to_string(),
        log_file: state.paths.daemon_log().display().to_string(),
        dns: Some(state.vms.dns_status()),
    })
}

async fn stop(State(state): Shared) -> Json<serde_json::Value> {
    let _ = state.stop.send(true);
    Json(serde_json::json!({ "stopping": true }))
}

/// Current time as RFC 3339, for `created_at` columns.
pub fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| "1970-01-01T00:00:00Z".to_owned())
}
