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

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use banger_agent::host::{
    AgentClient, Endpoint, ExecEvent as AgentEvent, ExecInput, ExecRequest as AgentExec,
};
use banger_agent::protocol::WindowSize;
use banger_api::vm::{
    CreateVmRequest, ExecEvent, ExecRequest, ExecResize, SshTarget, VmInfo, VmState,
};
use banger_api::{validate_name, ApiError, Boot, Deleted, ErrorCode};
use banger_config::{Config, Paths};
use banger_image::Progress;
use banger_net::{BridgeConfig, Network, SystemHostNet};
use banger_vmm::{AgentEndpoint, VmConfig, VmHandle};
use tokio::sync::Mutex as AsyncMutex;

use crate::dns::DnsService;
use crate::server::{internal, Emitter};
use crate::store::{self, Store, VmRow};
use crate::{fsutil, names, now_rfc3339, sshkeys, vmdisk};

/// How long a booting guest has to report ready (TCG guests are slow; KVM ones take a second).
/// In the VM's directory: the image's runtime settings (Env, WorkingDir, User) as JSON, copied
/// from the image at create time and handed to the agent in the initramfs at every start.
const IMAGE_RUNTIME_FILE: &str = "image-runtime.json";

fn boot_timeout() -> Duration {
    std::env::var("BANGER_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(180))
}

const GRACEFUL_STOP: Duration = Duration::from_secs(30);
const SUPERVISE_EVERY: Duration = Duration::from_millis(250);

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

/// A table shared between request tasks whose entries each live as long as a [`Registered`].
type Registry<V> = Arc<Mutex<HashMap<String, V>>>;

/// An entry in a [`Registry`], removed when this is dropped, however the owning call returns.
struct Registered<V> {
    table: Registry<V>,
    key: String,
}

impl<V> Registered<V> {
    fn insert(table: &Registry<V>, key: String, value: V) -> Self {
        table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), value);
        Registered {
            table: table.clone(),
            key,
        }
    }
}

impl<V> Drop for Registered<V> {
    fn drop(&mut self) {
        self.table
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.key);
    }
}

/// The agent request for an API exec request, checked: a command unless a terminal or stdin
/// can feed a login shell, and a window size only with a terminal.
pub(crate) fn agent_request(req: &ExecRequest) -> Result<AgentExec, ApiError> {
    if req.argv.is_empty() && !req.tty && !req.stdin {
        return Err(api(ErrorCode::BadRequest, "no command given")
            .with_hint("banger vm exec NAME -- CMD [ARGS...]"));
    }
    if !req.tty && (req.rows.is_some() || req.cols.is_some()) {
        return Err(api(
            ErrorCode::BadRequest,
            "rows and cols are the size of a terminal; they need tty",
        ));
    }
    if req.user.as_deref().is_some_and(|u| u.contains('\0')) {
        return Err(api(
            ErrorCode::BadRequest,
            "the user name contains a NUL byte",
        ));
    }
    let mut r = AgentExec::new(req.argv.clone());
    if let Some(cwd) = &req.cwd {
        r = r.cwd(cwd.clone());
    }
    for (k, v) in &req.env {
        r = r.env(k.clone(), v.clone());
    }
    if req.tty {
        r = r.tty(WindowSize::or_default(req.rows, req.cols));
    }
    if let Some(user) = &req.user {
        r = r.user(user.clone());
    }
    Ok(r)
}

/// The VM's network interface as its row records it (checked again: the row is only text).
fn nic(row: &VmRow) -> Result<banger_vmm::Nic, ApiError> {
    let bad = |e: &dyn std::fmt::Display| {
        api(
            ErrorCode::Internal,
            format!("VM {} has a broken network record: {e}", row.name),
        )
    };
    Ok(banger_vmm::Nic {
        tap: banger_net::TapName::parse(&row.tap).map_err(|e| bad(&e))?,
        mac: row.mac.parse().map_err(|e| bad(&e))?,
    })
}

fn api(code: ErrorCode, msg: impl Into<String>) -> ApiError {
    ApiError::new(code, msg)
}

fn agent_endpoint(e: &AgentEndpoint) -> Result<Endpoint, ApiError> {
    match e {
        AgentEndpoint::VirtioSerial { socket } => Ok(Endpoint::VirtioSerial {
            socket: socket.clone(),
        }),
        AgentEndpoint::FirecrackerVsock { uds, port } => Ok(Endpoint::FirecrackerVsock {
            uds: uds.clone(),
            port: *port,
        }),
        AgentEndpoint::Vsock { .. } => Err(api(
            ErrorCode::Internal,
            "host vsock agent channels are not supported by this banger",
        )),
    }
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
            exec_sessions: Arc::default(),
            starting: Arc::default(),
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

    /// Creates a VM (and starts it unless asked not to).
    pub async fn create(
        self: &Arc<Self>,
        req: CreateVmRequest,
        progress: Emitter,
    ) -> Result<VmInfo, ApiError> {
        progress.phase("allocate");
        let image_name = req.image.clone();
        let (found, _) = crate::images::image_with_kernel(&self.store, &image_name).await?;
        // From reading the image to cloning its files, a newer pull may not replace them.
        let image_held = self.image_locks.read(&found.name).await;
        let (image, kernel) = crate::images::image_with_kernel(&self.store, &found.name).await?;
        if req.spec.vcpu == 0 || req.spec.memory_mib < 128 || req.spec.disk_bytes < (64 << 20) {
            return Err(api(
                ErrorCode::BadRequest,
                format!(
                    "VM spec too small: {} vCPU, {} MiB memory, {} bytes disk",
                    req.spec.vcpu, req.spec.memory_mib, req.spec.disk_bytes
                ),
            )
            .with_hint("use at least 1 vCPU, 128 MiB of memory and a 64M disk"));
        }
        let agent_bin = agent_binary()?;

        // Name and lease, reserved in one transaction: the row in state `creating` is the lease.
        let requested = req.name.clone();
        if let Some(n) = &requested {
            validate_name("VM", n)?;
        }
        let subnet = self.net.config().subnet;
        let image_for_row = image.name.clone();
        let kernel_for_row = kernel.name.clone();
        let boot = image.boot;
        let spec = req.spec;
        let row = self
            .store
            .call(move |c| {
                let tx = c.transaction()?;
                let existing = store::list_vms(&tx)?;
                let name = match requested {
                    Some(n) => {
                        if existing.iter().any(|v| v.name == n) {
                            return Ok(Err(api(
                                ErrorCode::AlreadyExists,
                                format!("a VM named {n:?} already exists"),
                            )
                            .with_hint(
                                "pick another --name, or delete it with `banger vm delete`",
                            )));
                        }
                        n
                    }
                    None => names::generate(|n| existing.iter().any(|v| v.name == n)),
                };
                let leased = existing
                    .iter()
                    .filter_map(|v| v.ip.parse::<Ipv4Addr>().ok());
                let lease = match subnet.allocate(leased) {
                    Ok(l) => l,
                    Err(e) => return Ok(Err(api(ErrorCode::NoFreeAddress, e.to_string()))),
                };
                let id = names::short_id();
                let row = VmRow {
                    name,
                    tap: banger_net::TapName::for_vm(&id).as_str().to_owned(),
                    id,
                    image: image_for_row,
                    kernel: kernel_for_row,
                    state: VmState::Creating,
                    spec,
                    ip: lease.ip().to_string(),
                    mac: lease.mac().to_string(),
                    vmm: None,
                    handle: None,
                    created_at: now_rfc3339(),
                    last_error: None,
                    boot,
                };
                store::insert_vm(&tx, &row)?;
                tx.commit()?;
                Ok(Ok(row))
            })
            .await
            .map_err(internal)??;
        let name = row.name.clone();
        let lock = self.lock_for(&name);
        let _guard = lock.lock().await;
        progress.notice(&format!("VM {name}: {} ({})", row.ip, self.vmms.reason()));

        let prepared = self
            .prepare_disks(&row, Path::new(&image.rootfs), &agent_bin, &req, &progress)
            .await;
        drop(image_held);
        if let Err(e) = prepared {
            self.remove_everything(&row).await;
            return Err(e);
        }
        self.set_state(&name, VmState::Stopped, None, None, None)
            .await?;
        self.refresh_names().await;
        if req.start {
            if let Err(e) = self.start_locked(&name, &progress).await {
                // A guest that booted but never became ready is kept for inspection; any other
                // failure to start leaves no half-made VM behind.
                if e.code != ErrorCode::BootTimeout {
                    if let Ok(row) = self.row(&name).await {
                        self.remove_everything(&row).await;
                    }
                }
                return Err(e);
            }
        }
        self.show(&name).await
    }

    async fn prepare_disks(
        &self,
        row: &VmRow,
        image_rootfs: &Path,
        agent_bin: &Path,
        req: &CreateVmRequest,
        progress: &Emitter,
    ) -> Result<(), ApiError> {
        let dir = self.vm_dir(&row.name);
        let user_key = sshkeys::ensure_user_key(
            self.config.ssh_key_path.as_deref(),
            &self.paths.ssh_dir().join("id_ed25519"),
        )
        .await?;
        let authorized = std::fs::read_to_string(sshkeys::pub_path(&user_key)).map_err(|e| {
            api(
                ErrorCode::Internal,
                format!("cannot read {}.pub: {e}", user_key.display()),
            )
        })?;
        std::fs::create_dir_all(&dir).map_err(|e| {
            api(
                ErrorCode::Internal,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        // Only a guest with sshd needs a host key (pinned in known_hosts); the others hold the
        // image's runtime settings for the agent, which runs as their PID 1.
        let runtime = match row.boot {
            Boot::Systemd => {
                let host_key = dir.join("ssh_host_ed25519_key");
                sshkeys::keygen(&host_key, &format!("banger-{}", row.name)).await?;
                None
            }
            Boot::Agent => {
                let image = row.image.clone();
                let json = self
                    .store
                    .call(move |c| store::image_runtime(c, &image))
                    .await
                    .map_err(internal)?
                    .unwrap_or_else(|| "{}".to_owned());
                Some(json)
            }
        };

        progress.phase("clone root disk");
        let (src, root) = (image_rootfs.to_owned(), dir.join("root.ext4"));
        let kind = tokio::task::spawn_blocking(move || fsutil::clone_file(&src, &root))
            .await
            .map_err(|e| internal(e.into()))?
            .map_err(|e| disk_err(e, "cannot clone the image into the VM's root disk"))?;
        progress.log(&format!("root disk: {kind:?}"));

        progress.phase("prepare work disk");
        let dir2 = dir.clone();
        let agent = agent_bin.to_owned();
        let sync = req.file_sync.clone();
        let size = req.spec.disk_bytes;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let scratch = tempfile::tempdir_in(&dir2)?;
            let staging = scratch.path().join("work");
            std::fs::create_dir(&staging)?;
            vmdisk::make_work_disk(&dir2.join("work.ext4"), size, &authorized, &sync, &staging)?;
            match runtime {
                None => vmdisk::inject(
                    &dir2.join("root.ext4"),
                    &vmdisk::Injection {
                        agent_binary: &agent,
                        unit_text: banger_agent::SYSTEMD_UNIT,
                        host_key: &dir2.join("ssh_host_ed25519_key"),
                        host_key_pub: &dir2.join("ssh_host_ed25519_key.pub"),
                    },
                    scratch.path(),
                )?,
                Some(json) => {
                    let path = dir2.join(IMAGE_RUNTIME_FILE);
                    std::fs::write(&path, json)
                        .with_context(|| format!("cannot write {}", path.display()))?
                }
            }
            Ok(())
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_err(e, "cannot prepare the VM's disks"))?;
        Ok(())
    }

    /// Removes a VM's files, tap and row (used to roll back a failed create and by delete).
    async fn remove_everything(&self, row: &VmRow) {
        if let Some(handle) = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
        {
            let vmm = self.vmms.for_handle(&handle);
            if let Err(e) = vmm.stop(&handle, Duration::ZERO).await {
                tracing::warn!(vm = %row.name, "cannot kill VMM: {e}");
            }
        }
        self.release_network(row).await;
        let _ = tokio::fs::remove_dir_all(self.vm_dir(&row.name)).await;
        let _ = tokio::fs::remove_dir_all(self.run_dir(&row.id)).await;
        let n = row.name.clone();
        if let Err(e) = self.store.call(move |c| store::delete_vm(c, &n)).await {
            tracing::error!(vm = %row.name, "cannot delete VM row: {e:#}");
        }
        self.forget_agent(&row.name);
        self.refresh_names().await;
    }

    /// Deletes the VM's tap, and the whole host network when no other VM runs.
    async fn release_network(&self, row: &VmRow) {
        let _g = self.net_lock.lock().await;
        let net = self.net.clone();
        let id = row.id.clone();
        let name = row.name.clone();
        let others_running = self
            .store
            .call(move |c| {
                Ok(store::list_vms(c)?
                    .iter()
                    .any(|v| v.name != name && v.handle.is_some()))
            })
            .await
            .unwrap_or(true)
            || self
                .starting
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .any(|n| *n != row.name);
        if !others_running {
            // The server is bound to the bridge address, which goes with the bridge.
            self.dns.stop().await;
        }
        let r = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let _ = net.detach_vm(&id)?;
            if !others_running {
                let _ = net.teardown()?;
            }
            Ok(())
        })
        .await;
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %row.name, "cannot release network: {e:#}"),
            Err(e) => tracing::warn!(vm = %row.name, "network task failed: {e}"),
        }
    }

    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        progress: Emitter,
    ) -> Result<VmInfo, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        self.start_locked(name, &progress).await?;
        self.show(name).await
    }

    /// Boots a stopped VM and waits until its agent and sshd answer. Caller holds the VM lock.
    async fn start_locked(
        self: &Arc<Self>,
        name: &str,
        progress: &Emitter,
    ) -> Result<(), ApiError> {
        let row = self.row(name).await?;
        match row.state {
            VmState::Stopped | VmState::Failed => {}
            other => {
                return Err(api(
                    ErrorCode::InvalidState,
                    format!("VM {name} is {other}, not stopped"),
                )
                .with_hint(format!("stop it first with `banger vm stop {name}`")))
            }
        }
        let backend = self.vmms.for_new_vms().cloned().map_err(|e| {
            api(
                ErrorCode::VmmFailed,
                format!("no VMM can run VM {name}: {e}"),
            )
        })?;
        let kernel = {
            let k = row.kernel.clone();
            self.store
                .call(move |c| store::get_kernel(c, &k))
                .await
                .map_err(internal)?
                .ok_or_else(|| {
                    api(
                        ErrorCode::NotFound,
                        format!("kernel {} of VM {name} is missing", row.kernel),
                    )
                })?
        };

        let nic = nic(&row)?;

        progress.phase("network");
        let uid = nix::unistd::geteuid();
        let _starting = Registered::insert(&self.starting, name.to_owned(), ());
        {
            let _g = self.net_lock.lock().await;
            let net = self.net.clone();
            let id = row.id.clone();
            tokio::task::spawn_blocking(move || net.attach_vm(&id, uid))
                .await
                .map_err(|e| internal(e.into()))?
                .map_err(|e| {
                    api(ErrorCode::VmmFailed, format!("cannot set up the network for VM {name}: {e}"))
                        .with_hint("banger needs root or passwordless sudo for the bridge, tap and nft rules; see `banger doctor`")
                })?;
            self.dns.ensure_running().await;
        }

        progress.phase("boot");
        let dir = self.vm_dir(name);
        let run_dir = self.run_dir(&row.id);
        let console = dir.join("console.log");
        let prep = (|| -> std::io::Result<()> {
            let _ = std::fs::remove_dir_all(&run_dir);
            std::fs::create_dir_all(&run_dir)?;
            // Each boot starts a fresh console log so its tail is about this boot.
            std::fs::write(&console, b"")
        })();
        if let Err(e) = prep {
            self.release_network(&row).await;
            return Err(api(
                ErrorCode::Internal,
                format!("cannot prepare {}: {e}", run_dir.display()),
            ));
        }
        let gateway = self.net.config().subnet.gateway();
        let prefix = self.net.config().subnet.prefix_len();
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let settings = format!(
            "banger.ip={}/{prefix} banger.gw={gateway} banger.hostname={name} \
             banger.dns={gateway} banger.time={now}",
            row.ip
        );
        let (kernel_args, initrd) = match row.boot {
            Boot::Systemd => (
                format!(
                    "console=ttyS0 reboot=k panic=1 root=/dev/vda rw rootfstype=ext4 \
                     net.ifnames=0 systemd.show_status=0 {settings}"
                ),
                kernel.initrd.as_ref().map(PathBuf::from),
            ),
            // banger's initramfs: the kernel's modules plus the agent as /init and the image's
            // runtime settings, assembled for this start (so a new agent takes effect at once).
            Boot::Agent => {
                let initrd = run_dir.join("initrd.img");
                let made = self
                    .agent_initrd(&kernel, &dir.join(IMAGE_RUNTIME_FILE), &initrd)
                    .await;
                if let Err(e) = made {
                    self.release_network(&row).await;
                    return Err(e);
                }
                (
                    format!("console=ttyS0 reboot=k panic=1 root=/dev/vda rw rootfstype=ext4 {settings}"),
                    Some(initrd),
                )
            }
        };
        let cfg = VmConfig {
            name: name.to_owned(),
            vcpus: row.spec.vcpu,
            memory_mib: row.spec.memory_mib,
            kernel: PathBuf::from(&kernel.kernel),
            initrd,
            kernel_args,
            root_disk: dir.join("root.ext4"),
            work_disk: dir.join("work.ext4"),
            net: Some(nic),
            vsock_cid: None,
            run_dir: run_dir.clone(),
            console_log: console.clone(),
        };
        let handle = match backend.start(&cfg).await {
            Ok(h) => h,
            Err(e) => {
                self.release_network(&row).await;
                let msg = format!("VM {name} failed to start: {e}");
                self.set_state(
                    name,
                    VmState::Failed,
                    Some(backend.kind().as_str()),
                    None,
                    Some(&msg),
                )
                .await?;
                return Err(api(ErrorCode::VmmFailed, msg)
                    .with_hint(format!("console log: {}", console.display())));
            }
        };
        self.set_state(
            name,
            VmState::Running,
            Some(backend.kind().as_str()),
            Some(&handle),
            None,
        )
        .await?;
        self.supervise(name.to_owned(), handle.clone());

        progress.phase("wait for agent");
        let endpoint = agent_endpoint(&handle.agent)?;
        let ready = banger_agent::host::wait_ready(name, &endpoint, boot_timeout()).await;
        let client = match ready {
            Ok((client, _ready)) => client,
            Err(e) => {
                let console_tail = console.clone();
                let tail = tokio::task::spawn_blocking(move || {
                    banger_config::logtail::tail(&console_tail, 15)
                })
                .await
                .unwrap_or_default();
                return Err(api(
                    ErrorCode::BootTimeout,
                    format!(
                        "VM {name} did not become ready: {e}\nlast lines of its console:\n{tail}"
                    ),
                )
                .with_hint(format!(
                    "the VM is kept for inspection: full log {} (`banger vm logs {name}`); delete it with `banger vm delete --force {name}`",
                    console.display()
                )));
            }
        };
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), client);

        if row.boot != Boot::Systemd {
            // No sshd in this guest: the agent being up is what "up" means.
            return Ok(());
        }
        progress.phase("wait for ssh");
        let addr = format!("{}:22", row.ip);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            match tokio::time::timeout(Duration::from_secs(2), tokio::net::TcpStream::connect(&addr)).await {
                Ok(Ok(_)) => break,
                _ if tokio::time::Instant::now() > deadline => {
                    return Err(api(
                        ErrorCode::BootTimeout,
                        format!("VM {name} is up but sshd does not answer on {addr}"),
                    )
                    .with_hint(format!(
                        "the VM is kept; try `banger vm exec {name} -- systemctl status ssh`, or see `banger vm logs {name}`"
                    )))
                }
                _ => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        Ok(())
    }

    /// Writes the initramfs an agent-booted VM starts with: the kernel's modules archive, then an
    /// archive with the agent binary as `/init` and the image's runtime settings.
    async fn agent_initrd(
        &self,
        kernel: &banger_api::KernelInfo,
        runtime: &Path,
        out: &Path,
    ) -> Result<(), ApiError> {
        let agent = agent_binary()?;
        let modules = kernel.initrd.as_ref().map(PathBuf::from).ok_or_else(|| {
            api(
                ErrorCode::InvalidState,
                format!(
                    "kernel {} has no initramfs with modules, which images that boot with the agent need",
                    kernel.name
                ),
            )
            .with_hint("use the generic kernel: `banger kernel pull generic`")
        })?;
        let (runtime, out) = (runtime.to_owned(), out.to_owned());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            // Without it the image's User, Env and WorkingDir would silently be lost (commands
            // would run as root): refuse to start instead.
            let json = std::fs::read(&runtime).with_context(|| {
                format!(
                    "cannot read the image settings {} (recreate the VM)",
                    runtime.display()
                )
            })?;
            let mut f = std::io::BufWriter::new(
                std::fs::File::create(&out)
                    .with_context(|| format!("cannot create {}", out.display()))?,
            );
            let mut m = std::fs::File::open(&modules)
                .with_context(|| format!("cannot read {}", modules.display()))?;
            std::io::copy(&mut m, &mut f)?;
            banger_image::initramfs::agent_archive(&agent, &json, &mut f).with_context(|| {
                format!("cannot add the agent {} to the initramfs", agent.display())
            })?;
            use std::io::Write;
            f.flush()?;
            Ok(())
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_err(e, "cannot assemble the VM's initramfs"))
    }

    /// Watches a running VM's VMM; when it dies unasked, marks the VM stopped and frees its tap.
    fn supervise(self: &Arc<Self>, name: String, handle: VmHandle) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(SUPERVISE_EVERY).await;
                let h = handle.clone();
                let vmm = this.vmms.for_handle(&h).clone();
                let alive = tokio::task::spawn_blocking(move || vmm.is_alive(&h))
                    .await
                    .unwrap_or(true);
                if alive {
                    continue;
                }
                let lock = this.lock_for(&name);
                let _g = lock.lock().await;
                let Ok(row) = this.row(&name).await else {
                    return;
                };
                // Only act if the row still describes this run (stop/delete handle their own).
                let same_run = row
                    .handle
                    .as_deref()
                    .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
                    .is_some_and(|h| {
                        h.pid == handle.pid && h.pid_start_time == handle.pid_start_time
                    });
                if !same_run {
                    return;
                }
                tracing::warn!(vm = %name, pid = handle.pid, "VMM exited; marking the VM stopped");
                let _ = this
                    .vmms
                    .for_handle(&handle)
                    .stop(&handle, Duration::ZERO)
                    .await;
                this.forget_agent(&name);
                let _ = this
                    .set_state(
                        &name,
                        VmState::Stopped,
                        None,
                        None,
                        Some("the VMM process exited"),
                    )
                    .await;
                this.release_network(&row).await;
                return;
            }
        });
    }

    fn forget_agent(&self, name: &str) {
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name);
    }

    pub async fn stop(&self, name: &str, force: bool) -> Result<VmInfo, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        self.stop_locked(name, force).await?;
        self.show(name).await
    }

    async fn stop_locked(&self, name: &str, force: bool) -> Result<(), ApiError> {
        let row = self.row(name).await?;
        let Some(handle) = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
        else {
            if row.state != VmState::Stopped {
                self.set_state(name, VmState::Stopped, None, None, None)
                    .await?;
            }
            return Ok(());
        };
        self.set_state(name, VmState::Stopping, None, Some(&handle), None)
            .await?;
        let grace = if force { Duration::ZERO } else { GRACEFUL_STOP };
        if !force {
            // The agent's poweroff is the most reliable graceful path; the VMM's own request
            // (ACPI or Ctrl-Alt-Del) follows inside the backend's stop.
            let client = self
                .agents
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(name)
                .cloned();
            if let Some(c) = client {
                let _ = tokio::time::timeout(Duration::from_secs(5), c.poweroff()).await;
            }
        }
        self.forget_agent(name);
        let stopped = self.vmms.for_handle(&handle).stop(&handle, grace).await;
        if let Err(e) = stopped {
            let msg = format!("cannot stop VM {name}: {e}");
            self.set_state(name, VmState::Failed, None, Some(&handle), Some(&msg))
                .await?;
            return Err(api(ErrorCode::VmmFailed, msg));
        }
        self.set_state(name, VmState::Stopped, None, None, None)
            .await?;
        self.release_network(&row).await;
        Ok(())
    }

    pub async fn restart(
        self: &Arc<Self>,
        name: &str,
        progress: Emitter,
    ) -> Result<VmInfo, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        progress.phase("stop");
        self.stop_locked(name, false).await?;
        self.start_locked(name, &progress).await?;
        self.show(name).await
    }

    pub async fn delete(&self, name: &str, force: bool) -> Result<Deleted, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        let row = self.row(name).await?;
        if row.handle.is_some() && !force {
            return Err(api(ErrorCode::InvalidState, format!("VM {name} is {}", row.state)).with_hint(format!(
                "stop it first (`banger vm stop {name}`) or delete it anyway with `banger vm delete --force {name}`"
            )));
        }
        self.remove_everything(&row).await;
        Ok(Deleted {
            name: name.to_owned(),
        })
    }

    /// The agent connection of a running VM, reconnecting if the daemon restarted.
    async fn agent(&self, name: &str) -> Result<AgentClient, ApiError> {
        if let Some(c) = self
            .agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned()
        {
            return Ok(c);
        }
        let row = self.row(name).await?;
        let handle = row
            .handle
            .as_deref()
            .and_then(|h| serde_json::from_str::<VmHandle>(h).ok())
            .filter(|_| row.state == VmState::Running)
            .ok_or_else(|| {
                api(
                    ErrorCode::InvalidState,
                    format!("VM {name} is {}, not running", row.state),
                )
                .with_hint(format!("start it with `banger vm start {name}`"))
            })?;
        let endpoint = agent_endpoint(&handle.agent)?;
        let (client, _) = banger_agent::host::wait_ready(name, &endpoint, Duration::from_secs(20))
            .await
            .map_err(|e| {
                api(
                    ErrorCode::VmmFailed,
                    format!("cannot reach the agent of VM {name}: {e}"),
                )
            })?;
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), client.clone());
        Ok(client)
    }

    /// Runs a command through the agent, sending its output as exec events.
    pub async fn exec(
        &self,
        name: &str,
        req: ExecRequest,
        out: tokio::sync::mpsc::UnboundedSender<ExecEvent>,
    ) -> Result<(), ApiError> {
        use base64::Engine;
        let r = agent_request(&req)?;
        let client = self.agent(name).await?;
        let lost = |e: banger_agent::host::AgentError| {
            self.forget_agent(name);
            api(ErrorCode::VmmFailed, format!("exec in VM {name}: {e}"))
        };
        let mut handle = client.exec(r).await.map_err(|e| match e {
            // The connection is fine; the guest's agent is too old for this request.
            banger_agent::host::AgentError::Unsupported { .. } => {
                let hint = e.hint().map(|h| h.trim_start_matches("hint: ").to_string());
                let err = api(ErrorCode::InvalidState, e.to_string());
                match hint {
                    Some(h) => err.with_hint(h),
                    None => err,
                }
            }
            e => lost(e),
        })?;
        let session = hex::encode(rand::random::<[u8; 12]>());
        let _session = Registered::insert(
            &self.exec_sessions,
            session.clone(),
            (name.to_owned(), handle.input.clone()),
        );
        let _ = out.send(ExecEvent::Started { session });
        if !req.stdin {
            handle.input.close().await.map_err(lost)?;
        }
        let b64 = base64::engine::general_purpose::STANDARD;
        let mut hung_up = false;
        loop {
            let ev = tokio::select! {
                ev = handle.output.recv() => ev,
                // The caller went away (its stream was dropped): hang the command up, as a
                // closed terminal would (for a terminal session the agent hangs up the whole
                // session), and keep draining until it ends.
                _ = out.closed(), if !hung_up => {
                    hung_up = true;
                    let _ = handle.input.signal(libc::SIGHUP).await;
                    // Nobody will send it more input either.
                    let _ = handle.input.close().await;
                    continue;
                }
            };
            let Some(ev) = ev else { break };
            match ev.map_err(lost)? {
                AgentEvent::Stdout(b) => {
                    let _ = out.send(ExecEvent::Stdout {
                        data: b64.encode(&b),
                    });
                }
                AgentEvent::Stderr(b) => {
                    let _ = out.send(ExecEvent::Stderr {
                        data: b64.encode(&b),
                    });
                }
                AgentEvent::Exit(status) => {
                    let _ = out.send(ExecEvent::Exit {
                        code: status.shell_code(),
                    });
                    return Ok(());
                }
            }
        }
        Err(api(
            ErrorCode::VmmFailed,
            format!("lost the command's output in VM {name}"),
        ))
    }

    fn exec_input(&self, name: &str, session: &str) -> Result<ExecInput, ApiError> {
        match self
            .exec_sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(session)
        {
            Some((vm, input)) if vm == name => Ok(input.clone()),
            _ => Err(api(
                ErrorCode::NotFound,
                format!("no command with session {session} runs in VM {name}"),
            )
            .with_hint("the command may have ended already")),
        }
    }

    /// Streams `body` into a running command's stdin, then closes it. Returns the bytes sent.
    pub async fn exec_stdin(
        &self,
        name: &str,
        session: &str,
        body: axum::body::Body,
    ) -> Result<u64, ApiError> {
        use futures_util::StreamExt;
        let input = self.exec_input(name, session)?;
        let broken = |e: banger_agent::host::AgentError| {
            api(
                ErrorCode::VmmFailed,
                format!("cannot feed stdin of the command in VM {name}: {e}"),
            )
        };
        let mut stream = body.into_data_stream();
        let mut sent = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = match chunk {
                Ok(c) => c,
                Err(e) => {
                    // The caller is gone mid-upload: end the command's input rather than leave
                    // it waiting for more.
                    let _ = input.close().await;
                    return Err(api(
                        ErrorCode::BadRequest,
                        format!("stdin upload for VM {name} broke: {e}"),
                    ));
                }
            };
            input.write(&chunk).await.map_err(broken)?;
            sent += chunk.len() as u64;
        }
        input.close().await.map_err(broken)?;
        Ok(sent)
    }

    /// Sends `signal` to a running command's process group.
    pub async fn exec_signal(
        &self,
        name: &str,
        session: &str,
        signal: i32,
    ) -> Result<(), ApiError> {
        if !(1..=64).contains(&signal) {
            return Err(api(
                ErrorCode::BadRequest,
                format!("{signal} is not a signal number"),
            ));
        }
        let input = self.exec_input(name, session)?;
        input.signal(signal).await.map_err(|e| {
            api(
                ErrorCode::VmmFailed,
                format!("cannot signal the command in VM {name}: {e}"),
            )
        })
    }

    /// Gives a running terminal command a new window size.
    pub async fn exec_resize(
        &self,
        name: &str,
        session: &str,
        size: ExecResize,
    ) -> Result<(), ApiError> {
        if size.rows == 0 || size.cols == 0 {
            return Err(api(
                ErrorCode::BadRequest,
                format!(
                    "a terminal of {} rows and {} columns cannot be shown",
                    size.rows, size.cols
                ),
            ));
        }
        let input = self.exec_input(name, session)?;
        let size = WindowSize {
            rows: size.rows,
            cols: size.cols,
        };
        input.resize(size).await.map_err(|e| {
            api(
                ErrorCode::VmmFailed,
                format!("cannot resize the terminal of the command in VM {name}: {e}"),
            )
        })
    }

    pub async fn ssh_target(&self, name: &str) -> Result<SshTarget, ApiError> {
        let row = self.row(name).await?;
        if row.state != VmState::Running {
            return Err(api(
                ErrorCode::InvalidState,
                format!("VM {name} is {}, not running", row.state),
            )
            .with_hint(format!("start it with `banger vm start {name}`")));
        }
        if row.boot != banger_api::Boot::Systemd {
            return Err(api(
                ErrorCode::BadRequest,
                format!("VM {name} runs no sshd (its image boots with the agent as PID 1)"),
            )
            .with_hint(format!(
                "use `banger vm ssh {name}` or `banger vm exec {name} -- CMD`, which go through the agent"
            )));
        }
        let key = self
            .config
            .ssh_key_path
            .clone()
            .unwrap_or_else(|| self.paths.ssh_dir().join("id_ed25519"));
        Ok(SshTarget {
            name: row.name.clone(),
            ip: row.ip.clone(),
            user: "root".into(),
            identity_file: key.display().to_string(),
            known_hosts: self.paths.known_hosts().display().to_string(),
            host_key_alias: format!("{}.vm", row.name),
        })
    }

    /// Brings everything that maps VM names to VMs up to date with the store: the DNS zone,
    /// known_hosts (every VM's pinned host key) and ~/.config/banger/ssh_config.
    pub async fn refresh_names(&self) {
        let rows = match self.store.call(|c| store::list_vms(c)).await {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("cannot list VMs to refresh names: {e:#}");
                return;
            }
        };
        self.dns.set_names(
            rows.iter()
                .filter_map(|r| Some((r.name.clone(), r.ip.parse().ok()?))),
        );
        let entries: Vec<sshkeys::Pinned> = rows
            .iter()
            .filter_map(|r| {
                let key =
                    std::fs::read_to_string(self.vm_dir(&r.name).join("ssh_host_ed25519_key.pub"))
                        .ok()?;
                Some(sshkeys::Pinned {
                    names: vec![format!("{}.vm", r.name), r.ip.clone()],
                    public_key: key,
                })
            })
            .collect();
        if let Err(e) = sshkeys::write_known_hosts(&self.paths.known_hosts(), &entries) {
            tracing::warn!("cannot write known_hosts: {e:#}");
        }
        // ~/.config/banger/ssh_config: one `Host NAME.vm` per VM, for `ssh NAME.vm` once the
        // user includes it (`banger ssh-config --install`).
        let identity = self
            .config
            .ssh_key_path
            .clone()
            .unwrap_or_else(|| self.paths.ssh_dir().join("id_ed25519"));
        let hosts: Vec<banger_config::sshconfig::HostEntry> = rows
            .iter()
            // Only guests that run sshd get a Host entry; the others are reached through the agent.
            .filter(|r| r.boot == banger_api::Boot::Systemd)
            .filter_map(|r| {
                Some(banger_config::sshconfig::HostEntry {
                    name: r.name.clone(),
                    ip: r.ip.parse().ok()?,
                    identity_file: identity.clone(),
                    known_hosts: self.paths.known_hosts(),
                })
            })
            .collect();
        let text = banger_config::sshconfig::render_ssh_config(&hosts);
        if let Err(e) = banger_config::sshconfig::write_atomically(
            &self.paths.ssh_config(),
            text.as_bytes(),
            0o600,
        ) {
            tracing::warn!("cannot write {}: {e}", self.paths.ssh_config().display());
        }
    }

    /// Start-up repair: re-adopt live VMMs, mark dead ones stopped, roll back half-made VMs,
    /// remove taps no VM owns, and tear the network down when nothing runs.
    pub async fn reconcile(self: &Arc<Self>) -> anyhow::Result<()> {
        let rows = self.store.call(|c| store::list_vms(c)).await?;
        let mut live_taps = Vec::new();
        for row in &rows {
            let handle = row
                .handle
                .as_deref()
                .and_then(|h| serde_json::from_str::<VmHandle>(h).ok());
            match (row.state, handle) {
                (VmState::Creating, None) => {
                    tracing::info!(vm = %row.name, "rolling back a VM whose creation was interrupted");
                    self.remove_everything(row).await;
                }
                (_, Some(h)) if self.vmms.for_handle(&h).is_alive(&h) => {
                    tracing::info!(vm = %row.name, pid = h.pid, "re-adopting running VM");
                    live_taps.push(row.tap.clone());
                    if row.state != VmState::Running {
                        self.set_state(&row.name, VmState::Running, None, Some(&h), None)
                            .await
                            .map_err(|e| anyhow::anyhow!(e.message))?;
                    }
                    self.supervise(row.name.clone(), h);
                }
                (_, Some(_)) => {
                    tracing::info!(vm = %row.name, "VMM is gone; marking the VM stopped");
                    self.set_state(&row.name, VmState::Stopped, None, None, None)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                }
                (VmState::Running | VmState::Stopping, None) => {
                    self.set_state(&row.name, VmState::Stopped, None, None, None)
                        .await
                        .map_err(|e| anyhow::anyhow!(e.message))?;
                }
                _ => {}
            }
        }
        if rows.is_empty() {
            // banger has never had a VM here: it owns nothing on the host network to repair,
            // and stays out of it entirely (images-only use needs no privileges).
            return Ok(());
        }
        let net = self.net.clone();
        let any_live = !live_taps.is_empty();
        let net_result = tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let report = net.reconcile(&live_taps)?;
            for t in &report.removed {
                tracing::info!("removed orphaned tap {t}");
            }
            if live_taps.is_empty() {
                let _ = net.teardown()?;
            } else {
                // Re-adopted VMs keep their bridge; this also brings a table written by an
                // older banger (say, without the DNS redirect) up to date.
                let _ = net.ensure_host()?;
            }
            Ok(())
        })
        .await?;
        if let Err(e) = net_result {
            // A host where banger may not change the network still serves images and status.
            tracing::warn!("cannot reconcile the host network: {e:#}");
        } else if any_live {
            // Re-adopted VMs keep their bridge; serve their names again.
            self.dns.ensure_running().await;
        }
        self.refresh_names().await;
        Ok(())
    }
}

fn disk_err(e: anyhow::Error, what: &str) -> ApiError {
    let full = e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.raw_os_error() == Some(libc::ENOSPC))
    });
    let code = if full {
        ErrorCode::DiskFull
    } else {
        ErrorCode::Internal
    };
    api(code, format!("{what}: {e:#}"))
}

/// The guest agent binary: `BANGER_AGENT_BIN`, else `banger-agent` next to bangerd, else PATH.
fn agent_binary() -> Result<PathBuf, ApiError> {
    if let Some(p) = std::env::var_os("BANGER_AGENT_BIN") {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        return Err(api(
            ErrorCode::MissingTool,
            format!("BANGER_AGENT_BIN={} does not exist", p.display()),
        ));
    }
    let beside = std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join("banger-agent")))
        .filter(|p| p.is_file());
    let on_path = || {
        std::env::var_os("PATH").and_then(|path| {
            std::env::split_paths(&path)
                .map(|d| d.join("banger-agent"))
                .find(|p| p.is_file())
        })
    };
    beside.or_else(on_path).ok_or_else(|| {
        api(ErrorCode::MissingTool, "the guest agent binary banger-agent is not installed")
            .with_hint("install banger with `make install` (it builds the static agent), or set BANGER_AGENT_BIN")
    })
}
