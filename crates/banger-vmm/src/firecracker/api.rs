//! A typed, thin client for the part of Firecracker's REST API that banger uses, over the Unix
//! API socket (hyper 1, HTTP/1.1, one connection per request).
//!
//! Request bodies are serde structs whose field names are exactly those of Firecracker's
//! OpenAPI definitions (`spec/firecracker-v1.16.1.yaml`, checked by the contract tests); unset
//! optional fields are left out rather than sent as `null`. A failed request carries the
//! `fault_message` Firecracker answered with.

use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{ACCEPT, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::net::UnixStream;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot connect to Firecracker's API socket {socket}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{method} {path}: HTTP exchange failed")]
    Http {
        method: Method,
        path: String,
        #[source]
        source: hyper::Error,
    },
    #[error("{method} {path}: no answer within {after:?}")]
    Timeout {
        method: Method,
        path: String,
        after: Duration,
    },
    #[error("{path}: cannot encode the request body")]
    Encode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{path}: unexpected response body {body:?}")]
    Decode {
        path: String,
        body: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("{method} {path}: Firecracker answered {status}: {fault_message}")]
    Fault {
        method: Method,
        path: String,
        status: StatusCode,
        fault_message: String,
    },
}

/// `PUT /machine-config` (definition `MachineConfiguration`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineConfiguration {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    None,
    #[serde(rename = "2M")]
    TwoMiB,
}

/// `PUT /boot-source` (definition `BootSource`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootSource {
    pub kernel_image_path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// `PUT /drives/{drive_id}` (definition `Drive`, virtio-block flavour).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Drive {
    pub drive_id: String,
    pub path_on_host: PathBuf,
    pub is_root_device: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CacheType {
    Unsafe,
    Writeback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IoEngine {
    Sync,
    Async,
}

/// `PUT /network-interfaces/{iface_id}` (definition `NetworkInterface`); also read back in
/// [`FullVmConfiguration`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    pub iface_id: String,
    pub host_dev_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

/// `PUT /vsock` (definition `Vsock`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Vsock {
    pub guest_cid: u32,
    pub uds_path: PathBuf,
}

/// `PUT /logger` (definition `Logger`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Logger {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub log_path: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
    Trace,
    Off,
}

/// `PUT /actions` (definition `InstanceActionInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceActionInfo {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// `PATCH /vm` (definition `Vm`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Vm {
    pub state: VmState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum VmState {
    Paused,
    Resumed,
}

/// `PUT /snapshot/create` (definition `SnapshotCreateParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreateParams {
    pub mem_file_path: PathBuf,
    pub snapshot_path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    Full,
    Diff,
}

/// `PUT /snapshot/load` (definition `SnapshotLoadParams`; the deprecated `mem_file_path` and
/// `enable_diff_snapshots` are left out).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoadParams {
    pub snapshot_path: PathBuf,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
}

/// Definition `MemoryBackend`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemoryBackendType {
    File,
    Uffd,
}

/// Definition `NetworkOverride`: another tap for an interface of a loaded snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkOverride {
    pub iface_id: String,
    pub host_dev_name: String,
}

/// Definition `VsockOverride`: another host socket for the loaded vsock device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockOverride {
    pub uds_path: PathBuf,
}

/// `GET /vm/config` (definition `FullVmConfiguration`): the parts banger reads.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FullVmConfiguration {
    #[serde(rename = "machine-config")]
    pub machine_config: Option<MachineConfiguration>,
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
}

/// `GET /` (definition `InstanceInfo`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct InstanceInfo {
    pub app_name: String,
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    pub vmm_version: String,
}

/// `GET /version` (definition `FirecrackerVersion`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct FirecrackerVersion {
    pub firecracker_version: String,
}

#[derive(Deserialize)]
struct FaultBody {
    fault_message: Option<String>,
}

/// Client for one Firecracker process's API socket.
#[derive(Debug, Clone)]
pub struct FirecrackerClient {
    socket: PathBuf,
    timeout: Duration,
}

impl FirecrackerClient {
    pub fn new(socket: impl Into<PathBuf>) -> FirecrackerClient {
        FirecrackerClient {
            socket: socket.into(),
            timeout: Duration::from_secs(10),
        }
    }

    /// Bounds each request (connect to end of response).
    pub fn with_timeout(mut self, timeout: Duration) -> FirecrackerClient {
        self.timeout = timeout;
        self
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    pub async fn describe_instance(&self) -> Result<InstanceInfo, ApiError> {
        self.get("/").await
    }

    pub async fn version(&self) -> Result<FirecrackerVersion, ApiError> {
        self.get("/version").await
    }

    pub async fn machine_config(&self) -> Result<MachineConfiguration, ApiError> {
        self.get("/machine-config").await
    }

    pub async fn put_machine_config(&self, body: &MachineConfiguration) -> Result<(), ApiError> {
        self.put("/machine-config", body).await
    }

    pub async fn put_boot_source(&self, body: &BootSource) -> Result<(), ApiError> {
        self.put("/boot-source", body).await
    }

    pub async fn put_drive(&self, body: &Drive) -> Result<(), ApiError> {
        self.put(&format!("/drives/{}", body.drive_id), body).await
    }

    pub async fn put_network_interface(&self, body: &NetworkInterface) -> Result<(), ApiError> {
        self.put(&format!("/network-interfaces/{}", body.iface_id), body)
            .await
    }

    pub async fn put_vsock(&self, body: &Vsock) -> Result<(), ApiError> {
        self.put("/vsock", body).await
    }

    pub async fn put_logger(&self, body: &Logger) -> Result<(), ApiError> {
        self.put("/logger", body).await
    }

    pub async fn vm_config(&self) -> Result<FullVmConfiguration, ApiError> {
        self.get("/vm/config").await
    }

    pub async fn patch_vm(&self, state: VmState) -> Result<(), ApiError> {
        self.send_json(Method::PATCH, "/vm", &Vm { state }).await
    }

    pub async fn create_snapshot(&self, body: &SnapshotCreateParams) -> Result<(), ApiError> {
        self.put("/snapshot/create", body).await
    }

    pub async fn load_snapshot(&self, body: &SnapshotLoadParams) -> Result<(), ApiError> {
        self.put("/snapshot/load", body).await
    }

    pub async fn action(&self, action_type: ActionType) -> Result<(), ApiError> {
        self.put("/actions", &InstanceActionInfo { action_type })
            .await
    }

    async fn get<R: DeserializeOwned>(&self, path: &str) -> Result<R, ApiError> {
        let body = self.send(Method::GET, path, None).await?;
        serde_json::from_slice(&body).map_err(|source| ApiError::Decode {
            path: path.to_string(),
            body: String::from_utf8_lossy(&body).into_owned(),
            source,
        })
    }

    async fn put<B: Serialize>(&self, path: &str, body: &B) -> Result<(), ApiError> {
        self.send_json(Method::PUT, path, body).await
    }

    async fn send_json<B: Serialize>(
        &self,
        method: Method,
        path: &str,
        body: &B,
    ) -> Result<(), ApiError> {
        let json = serde_json::to_vec(body).map_err(|source| ApiError::Encode {
            path: path.to_string(),
            source,
        })?;
        self.send(method, path, Some(json)).await.map(|_| ())
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let exchange = self.exchange(method.clone(), path, body);
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok(r) => r,
            Err(_) => Err(ApiError::Timeout {
                method,
                path: path.to_string(),
                after: self.timeout,
            }),
        }
    }

    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<Bytes, ApiError> {
        let http = |source| ApiError::Http {
            method: method.clone(),
            path: path.to_string(),
            source,
        };
        let stream =
            UnixStream::connect(&self.socket)
                .await
                .map_err(|source| ApiError::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
        // Title-case header names, as every other Firecracker client sends them.
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .title_case_headers(true)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(http)?;

        let builder = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(HOST, "localhost")
            .header(ACCEPT, "application/json");
        let request = match body {
            Some(b) => builder
                .header(CONTENT_TYPE, "application/json")
                .body(Full::new(Bytes::from(b))),
            None => builder.body(Full::new(Bytes::new())),
        };
        // Only a malformed path can make the builder fail; our paths are literals and ids.
        let request = request.map_err(|e| ApiError::Fault {
            method: method.clone(),
            path: path.to_string(),
            status: StatusCode::BAD_REQUEST,
            fault_message: format!("cannot build request: {e}"),
        })?;

        // Drive the connection in this future rather than a spawned task, so that it (and the
        // socket) is gone the moment this request is done.
        let exchange = async {
            let response = sender.send_request(request).await.map_err(http)?;
            let status = response.status();
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(http)?
                .to_bytes();
            Ok::<_, ApiError>((status, bytes))
        };
        let mut exchange = std::pin::pin!(exchange);
        let mut conn = std::pin::pin!(conn);
        let mut conn_done = false;
        let result = loop {
            tokio::select! {
                r = &mut exchange => break r,
                c = &mut conn, if !conn_done => {
                    conn_done = true;
                    if let Err(e) = c {
                        break Err(http(e));
                    }
                }
            }
        };
        let (status, bytes) = result?;
        if status.is_success() {
            return Ok(bytes);
        }
        let fault_message = serde_json::from_slice::<FaultBody>(&bytes)
            .ok()
            .and_then(|f| f.fault_message)
            .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
        Err(ApiError::Fault {
            method: method.clone(),
            path: path.to_string(),
            status,
            fault_message,
        })
    }
}
