//! The VM service: the lifecycle state machine (create, start, stop, delete), supervision of
//! VMM processes, start-up reconcile, and commands through the guest agent.
//!
//! Each VM has a row (its lease is the row's unique `ip`), a directory `STATE/vms/NAME/` with
//! its disks, host key and console log, and while it runs a VMM process, a tap and a run
//! directory `RUNTIME/vms/ID/` for sockets. Every step is recorded before the next begins, so a
//! crash can be repaired at start-up: a half-created VM (state `creating`, no VMM) is rolled
//! back; a VM whose VMM is gone becomes `stopped`; a live VMM is re-adopted. Operations on one
//! VM are serialised by a per-VM lock; the host network is set up when a VM starts and torn down
//! when the last running VM stops, so nothing of banger stays on the host while no VM runs.
//!
//! One file per operation: [`create`], [`start`] (and restart), [`stop`], [`delete`], [`exec`],
//! [`ssh`], [`supervise`], [`reconcile`] and [`refresh_names`]; [`network`] and [`agent`] hold
//! what several of them share (the network's lifetime, the guest agent). This file keeps the
//! service itself and the queries every operation starts from.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use banger_agent::host::{AgentClient, ExecInput};
use banger_api::vm::{VmInfo, VmState};
use banger_api::{ApiError, ErrorCode};
use banger_config::{Config, Paths};
use banger_net::{BridgeConfig, Network, SystemHostNet};
use banger_vmm::VmHandle;
use tokio::sync::Mutex as AsyncMutex;

use crate::dns::DnsService;
use crate::registry::Registry;
use crate::server::internal;
use crate::store::{self, Store, VmRow};

mod agent;
mod create;
mod delete;
mod exec;
mod network;
mod reconcile;
mod refresh_names;
mod ssh;
mod start;
mod stop;
mod supervise;

pub struct Vms {
    paths: Paths,
    store: Store,
    config: Config,
    net: Arc<Network<SystemHostNet>>,
    net_lock: AsyncMutex<()>,
    dns: DnsService,
    /// The VMM new VMs start on, and the one for each running VM's handle.
    vmms: banger_vmm::Backends,
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    agents: Mutex<HashMap<String, AgentClient>>,
    /// Running `vm exec` commands by session id: (VM name, the command's input side).
    exec_sessions: Registry<(String, ExecInput)>,
    /// VMs between "network attached" and "VMM handle recorded": they need the bridge although
    /// the store does not show them running yet.
    starting: Registry<()>,
    /// Held for reading while a VM is made from an image (see `image_locks`).
    image_locks: crate::image_locks::ImageLocks,
}

/// In the VM's directory: the image's runtime settings (Env, WorkingDir, User) as JSON, copied
/// from the image at create time and handed to the agent in the initramfs at every start.
const IMAGE_RUNTIME_FILE: &str = "image-runtime.json";

fn api(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl Vms {
    pub fn new(
        paths: Paths,
        store: Store,
        config: Config,
        image_locks: crate::image_locks::ImageLocks,
    ) -> anyhow::Result<Self> {
        let net_config = BridgeConfig::parse(config.bridge(), config.subnet())
            .context("invalid bridge_name or bridge_subnet in config")?;
        let dns = DnsService::new(net_config.clone());
        let net = Network::new(
            SystemHostNet::new(banger_net::PrivilegedRunner::detect()),
            net_config,
        );
        let vmms =
            banger_vmm::Backends::for_this_host(&banger_vmm::VmmSettings::from_config(&config));
        Ok(Self {
            paths,
            store,
            config,
            net: Arc::new(net),
            net_lock: AsyncMutex::new(()),
            dns,
            vmms,
            locks: Mutex::default(),
            agents: Mutex::default(),
            exec_sessions: Registry::default(),
            starting: Registry::default(),
            image_locks,
        })
    }

    pub fn dns_status(&self) -> banger_api::DnsStatus {
        self.dns.status()
    }

    pub fn backend_reason(&self) -> &str {
        self.vmms.reason()
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.paths.state_dir.join("vms").join(name)
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.paths.runtime_dir.join("vms").join(id)
    }

    fn lock_for(&self, name: &str) -> Arc<AsyncMutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(name.to_owned()).or_default().clone()
    }

    fn info(&self, row: &VmRow) -> VmInfo {
        let handle: Option<VmHandle> = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str(h).ok());
        VmInfo {
            name: row.name.clone(),
            state: row.state,
            image: row.image.clone(),
            kernel: row.kernel.clone(),
            spec: row.spec,
            ip: row.ip.clone(),
            mac: row.mac.clone(),
            tap: row.tap.clone(),
            vmm: row.vmm.clone(),
            pid: handle.map(|h| h.pid),
            created_at: row.created_at.clone(),
            console_log: self
                .vm_dir(&row.name)
                .join("console.log")
                .display()
                .to_string(),
            dir: self.vm_dir(&row.name).display().to_string(),
            last_error: row.last_error.clone(),
            // banger's Debian images run sshd; images booted with the agent as PID 1 do not.
            ssh: row.boot == banger_api::Boot::Systemd,
        }
    }

    pub async fn list(&self) -> Result<Vec<VmInfo>, ApiError> {
        let rows = self
            .store
            .call(|c| store::list_vms(c))
            .await
            .map_err(internal)?;
        Ok(rows.iter().map(|r| self.info(r)).collect())
    }

    async fn row(&self, name: &str) -> Result<VmRow, ApiError> {
        let n = name.to_owned();
        let (row, all) = self
            .store
            .call(move |c| Ok((store::get_vm(c, &n)?, store::list_vms(c)?)))
            .await
            .map_err(internal)?;
        row.ok_or_else(|| {
            let known: Vec<String> = all.into_iter().map(|r| r.name).collect();
            let known = if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            };
            api(
                ErrorCode::NotFound,
                format!("no VM named {name:?} (VMs: {known})"),
            )
            .with_hint("see `banger vm list`, or create one with `banger vm create`")
        })
    }

    pub async fn show(&self, name: &str) -> Result<VmInfo, ApiError> {
        Ok(self.info(&self.row(name).await?))
    }

    async fn set_state(
        &self,
        name: &str,
        state: VmState,
        vmm: Option<&str>,
        handle: Option<&VmHandle>,
        last_error: Option<&str>,
    ) -> Result<(), ApiError> {
        let n = name.to_owned();
        let vmm = vmm.map(str::to_owned);
        let handle = handle
            .map(serde_json::to_string)
            .transpose()
            .map_err(|e| internal(e.into()))?;
        let last_error = last_error.map(str::to_owned);
        self.store
            .call(move |c| {
                store::set_vm_state(
                    c,
                    &n,
                    state,
                    vmm.as_deref(),
                    handle.as_deref(),
                    last_error.as_deref(),
                )
            })
            .await
            .map_err(internal)
    }
}
