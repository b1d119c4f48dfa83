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
//! One file per operation: [`create`] (from an image, or `--from` a snapshot), [`start`] (and
//! restart, and a restore from a snapshot), [`stop`], [`delete`], [`exec`], [`ssh`],
//! [`snapshot`] (and snapshot list and delete), [`warm`] (warm starts), [`fork`],
//! [`supervise`], [`reconcile`] and [`refresh_names`]; [`network`] and [`agent`] hold
//! what several of them share (the network's lifetime, the guest agent). This file keeps the
//! service itself and the queries every operation starts from.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use banger_agent::host::{AgentClient, ExecInput};
use banger_api::vm::{VmInfo, VmState};
use banger_api::{ApiError, ErrorCode};
use banger_config::{Config, Paths};
use banger_net::{HostNet, Network};
use banger_vmm::{Backends, VmHandle};
use tokio::sync::Mutex as AsyncMutex;

use crate::dns::NameService;
use crate::registry::Registry;
use crate::server::internal;
use crate::store::{self, Store, VmRow};

mod agent;
mod create;
mod delete;
mod exec;
mod fork;
mod network;
mod reconcile;
mod refresh_names;
mod snapshot;
mod ssh;
mod start;
mod stop;
mod supervise;
#[cfg(test)]
mod tests;
mod warm;

pub use agent::AgentBinary;
pub use snapshot::snapshot_dir;

/// Exec events (output chunks of at most the agent's chunk size) the daemon holds for one
/// client before it stops taking more from the guest.
pub const EXEC_EVENTS_IN_FLIGHT: usize = 16;
pub use start::{SshdProbe, TcpSshd};

/// What the VM service does to the host beyond its own files and rows, built once by the
/// daemon (the real host) or by a test (fakes: banger-net's `FakeHostNet`, banger-vmm's
/// `FakeVmm`), so the lifecycle is tested without root and without a guest.
pub struct Effects {
    /// The bridge, taps and NAT.
    pub net: Arc<Network<dyn HostNet>>,
    /// The VMM new VMs start on, and the one for each running VM's handle.
    pub vmms: Backends,
    /// The `.vm` names and their server.
    pub dns: Arc<dyn NameService>,
    /// Whether a booted guest's sshd answers.
    pub sshd: Arc<dyn SshdProbe>,
    /// The guest agent binary put into VMs.
    pub agent_binary: AgentBinary,
    pub timeouts: Timeouts,
}

/// How long the lifecycle waits. The defaults suit real guests; tests make them short.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timeouts {
    /// A booting guest's agent reporting ready: `BANGER_BOOT_TIMEOUT` seconds, else 180 (TCG
    /// guests are slow; KVM ones take a second).
    pub boot: Duration,
    /// sshd answering once the agent has.
    pub sshd: Duration,
    /// A guest shutting down when asked, before its VMM is killed.
    pub graceful_stop: Duration,
    /// The agent's answer to a power-off request.
    pub poweroff: Duration,
    /// Reaching a running VM's agent again (after a daemon restart).
    pub reconnect: Duration,
    /// How often a running VM's VMM is checked.
    pub supervise_every: Duration,
}

impl Timeouts {
    pub fn from_env() -> Timeouts {
        let boot = std::env::var("BANGER_BOOT_TIMEOUT")
            .ok()
            .and_then(|s| s.parse().ok())
            .map(Duration::from_secs)
            .unwrap_or(Duration::from_secs(180));
        Timeouts {
            boot,
            sshd: Duration::from_secs(60),
            graceful_stop: Duration::from_secs(30),
            poweroff: Duration::from_secs(5),
            reconnect: Duration::from_secs(20),
            supervise_every: Duration::from_millis(250),
        }
    }
}

pub struct Vms {
    paths: Paths,
    store: Store,
    config: Config,
    net: Arc<Network<dyn HostNet>>,
    net_lock: AsyncMutex<()>,
    /// Held by a refresh of the names from reading the store to writing the files: refreshes
    /// running at once would otherwise let an older view of the VMs overwrite a newer one.
    names_lock: AsyncMutex<()>,
    dns: Arc<dyn NameService>,
    /// The VMM new VMs start on, and the one for each running VM's handle.
    vmms: Backends,
    sshd: Arc<dyn SshdProbe>,
    agent_binary: AgentBinary,
    timeouts: Timeouts,
    locks: Mutex<HashMap<String, Arc<AsyncMutex<()>>>>,
    agents: Mutex<HashMap<String, AgentClient>>,
    /// Running `vm exec` commands by session id: (VM name, the command's input side).
    exec_sessions: Registry<(String, ExecInput)>,
    /// VMs between "network attached" and "VMM handle recorded": they need the bridge although
    /// the store does not show them running yet.
    starting: Registry<()>,
    /// Held for reading while a VM is made from an image (see `image_locks`).
    image_locks: crate::image_locks::ImageLocks,
    /// Warm-snapshot slots (image, VMM, shape) a create is making a snapshot for right now.
    warming: Registry<()>,
    /// Per-snapshot reader/writer locks (the same keyed lock images use): a create holds its
    /// snapshot for reading until the VMM has loaded it, deleting one holds it for writing.
    snapshot_leases: crate::image_locks::ImageLocks,
    agent_digest: Arc<warm::AgentDigest>,
}

/// In the VM's directory: the image's runtime settings (Env, WorkingDir, User) as JSON, copied
/// from the image at create time and handed to the agent in the initramfs at every start.
const IMAGE_RUNTIME_FILE: &str = "image-runtime.json";

/// In the VM's directory: its SSH host key (and `.pub`), pinned in known_hosts.
const HOST_KEY: &str = "ssh_host_ed25519_key";

fn api(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

impl Vms {
    pub fn new(
        paths: Paths,
        store: Store,
        config: Config,
        image_locks: crate::image_locks::ImageLocks,
        effects: Effects,
    ) -> Self {
        let Effects {
            net,
            vmms,
            dns,
            sshd,
            agent_binary,
            timeouts,
        } = effects;
        Self {
            paths,
            store,
            config,
            net,
            net_lock: AsyncMutex::new(()),
            names_lock: AsyncMutex::new(()),
            dns,
            vmms,
            sshd,
            agent_binary,
            timeouts,
            locks: Mutex::default(),
            agents: Mutex::default(),
            exec_sessions: Registry::default(),
            starting: Registry::default(),
            image_locks,
            warming: Registry::default(),
            snapshot_leases: Default::default(),
            agent_digest: Arc::default(),
        }
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

    /// The guest's console log (see [`crate::console_log`]).
    fn console_log(&self, name: &str) -> PathBuf {
        self.vm_dir(name).join("console.log")
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
            console_log: self.console_log(&row.name).display().to_string(),
            dir: self.vm_dir(&row.name).display().to_string(),
            last_error: row.last_error.clone(),
            // banger's Debian images run sshd; images booted with the agent as PID 1 do not.
            ssh: row.boot == banger_api::Boot::Systemd,
            host_access: row.host_access
                || self.net.config().host_access == banger_net::HostAccess::Open,
            egress: {
                let e = self.egress(row);
                banger_api::vm::EgressInfo {
                    mode: e.mode().to_owned(),
                    hosts: e.hosts().iter().map(ToString::to_string).collect(),
                }
            },
            started_from: None,
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
