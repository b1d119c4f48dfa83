//! The Firecracker backend: spawns `firecracker --api-sock`, configures the microVM through its
//! API ([`api`]) and starts it; stops it with Ctrl-Alt-Del, then SIGKILL.
//!
//! Per-VM files in `run_dir`: `fc.sock` (API), `fc-vsock.sock` (vsock bridge; the agent is
//! reached through it on port [`AGENT_PORT`]), `firecracker.log` (Firecracker's own log, set via
//! `PUT /logger`), `vmm.pid`, and `rootfs.disk` and `work.disk`, symlinks to the VM's disks.
//! Firecracker runs in `run_dir` and is given the disks by those relative names: a snapshot
//! records the paths it was given and Firecracker's snapshot load cannot override them, so a VM
//! restored in its own run directory opens its own disks, never the snapshotted VM's. Firecracker
//! writes the guest's serial console to its stdout, which is appended to the configured console
//! log together with its stderr.

mod api;
mod snapshot;

use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use api::*;

use crate::host::HostFacts;
use crate::kvm::KvmMode;
use crate::process::{self, Launcher, LogMode, RealLauncher, SpawnSpec, Spawned};
use crate::select::{Availability, Support, VmmSettings};
use crate::{
    check_inputs, AgentEndpoint, BackendKind, BoxFuture, SnapshotInfo, SnapshotPaths, VmConfig,
    VmHandle, Vmm, VmmError, WhilePaused, AGENT_PORT, PID_FILE,
};

/// Firecracker's program name, looked up on `PATH` unless `firecracker_bin` says otherwise.
pub(crate) const PROGRAM: &str = "firecracker";
/// Where to get it, for the message that says it is missing.
const WHERE_TO_GET: &str = "Firecracker is not packaged by Debian: take the \
     firecracker-vX.Y.Z-x86_64 binary from the release tarball on Firecracker's GitHub releases page";
/// What to do when it is missing.
pub(crate) const INSTALL_HINT: &str = "set firecracker_bin in ~/.config/banger/config.toml, put \
     firecracker on PATH, or use vmm = \"qemu\"";

pub(crate) const API_SOCKET: &str = "fc.sock";
pub(crate) const VSOCK_UDS: &str = "fc-vsock.sock";
pub(crate) const FIRECRACKER_LOG: &str = "firecracker.log";
pub(crate) const ROOT_LINK: &str = "rootfs.disk";
pub(crate) const WORK_LINK: &str = "work.disk";
/// Guest CID when the config has none: Firecracker's vsock is per-VM, so any CID >= 3 works.
const DEFAULT_GUEST_CID: u32 = 3;
const READY_TIMEOUT: Duration = Duration::from_secs(10);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What Firecracker needs of a host: KVM that boots ordinary kernels (hardware KVM; on
/// `kvm_pvm` only PVM-enabled guest kernels boot), and its program (`firecracker_bin`, a path
/// or a name on `PATH`).
pub(crate) fn availability(host: &dyn HostFacts, settings: &VmmSettings) -> Availability {
    let kvm = host.kvm();
    let support = match kvm {
        KvmMode::Absent | KvmMode::Unusable(_) => Support::Unusable {
            why: kvm.describe(),
            error: VmmError::KvmUnusable {
                reason: kvm.describe(),
            },
        },
        KvmMode::NestedSoftware => Support::Limited {
            why: kvm.describe(),
            consequence: "only PVM-enabled guest kernels boot",
        },
        KvmMode::HardwareIntel | KvmMode::HardwareAmd => Support::Full,
    };
    let binary = find_program(host, settings.firecracker_bin.as_deref());
    let label = match &binary {
        Ok(b) => format!("firecracker ({})", b.display()),
        Err(_) => PROGRAM.to_string(),
    };
    Availability {
        kind: BackendKind::Firecracker,
        support,
        binary,
        label,
        kvm,
    }
}

/// The configured program: a bare name is looked up on `PATH` like a shell would; anything with
/// a slash is a path.
fn find_program(host: &dyn HostFacts, configured: Option<&Path>) -> Result<PathBuf, VmmError> {
    let not_found = |binary: String, searched: &str| VmmError::BinaryNotFound {
        backend: BackendKind::Firecracker,
        binary,
        searched: searched.to_string(),
        install: WHERE_TO_GET.to_string(),
    };
    match configured {
        Some(p) if p.components().count() > 1 || p.is_absolute() => {
            if host.is_executable(p) {
                Ok(p.to_path_buf())
            } else {
                Err(not_found(
                    p.display().to_string(),
                    "configured firecracker_bin is not an executable file",
                ))
            }
        }
        other => {
            let name = other.map_or(OsStr::new(PROGRAM), |p| p.as_os_str());
            host.find_on_path(name)
                .ok_or_else(|| not_found(name.to_string_lossy().into_owned(), "searched PATH"))
        }
    }
}

/// Runs VMs with Firecracker.
pub struct FirecrackerBackend {
    binary: PathBuf,
    launcher: Arc<dyn Launcher>,
}

/// The run-directory paths of one Firecracker VM.
#[derive(Debug, Clone)]
pub(crate) struct Files {
    pub api_socket: PathBuf,
    pub vsock_uds: PathBuf,
    pub log: PathBuf,
    pub pid_file: PathBuf,
    /// The symlinks to the root and work disks, which Firecracker is given as [`ROOT_LINK`]
    /// and [`WORK_LINK`], relative to the run directory it runs in.
    pub root_link: PathBuf,
    pub work_link: PathBuf,
}

impl Files {
    pub(crate) fn new(run_dir: &Path) -> Files {
        Files {
            api_socket: run_dir.join(API_SOCKET),
            vsock_uds: run_dir.join(VSOCK_UDS),
            log: run_dir.join(FIRECRACKER_LOG),
            pid_file: run_dir.join(PID_FILE),
            root_link: run_dir.join(ROOT_LINK),
            work_link: run_dir.join(WORK_LINK),
        }
    }
}

impl FirecrackerBackend {
    pub fn new(binary: PathBuf) -> FirecrackerBackend {
        FirecrackerBackend {
            binary,
            launcher: Arc::new(RealLauncher),
        }
    }

    #[cfg(test)]
    pub(crate) fn with_launcher(binary: PathBuf, launcher: Arc<dyn Launcher>) -> Self {
        FirecrackerBackend { binary, launcher }
    }

    async fn start_vm(&self, cfg: &VmConfig) -> Result<VmHandle, VmmError> {
        check_inputs(cfg)?;
        let (spawned, client, files) = self.launch(cfg).await?;
        let booted = async {
            configure(&client, cfg, &files).await?;
            client
                .action(ActionType::InstanceStart)
                .await
                .map_err(|source| VmmError::Api {
                    vm: cfg.name.clone(),
                    step: "starting the instance",
                    source,
                })
        }
        .await;
        if let Err(e) = booted {
            // Never leave a half-configured Firecracker behind.
            let _ = process::terminate(spawned.pid, spawned.start_time, Duration::ZERO).await;
            return Err(e);
        }
        Ok(handle(&cfg.name, &cfg.run_dir, spawned))
    }

    /// Spawns a fresh Firecracker for `cfg` (inputs already checked) and waits until its API
    /// answers; nothing is configured yet. Start and restore share it.
    async fn launch(
        &self,
        cfg: &VmConfig,
    ) -> Result<(Spawned, FirecrackerClient, Files), VmmError> {
        let files = Files::new(&cfg.run_dir);
        let io = |action: &str| {
            let vm = cfg.name.clone();
            let action = action.to_string();
            move |source| VmmError::Io { vm, action, source }
        };
        // Firecracker refuses to bind sockets that already exist.
        for stale in [&files.api_socket, &files.vsock_uds, &files.pid_file] {
            process::remove_stale(stale)
                .map_err(io("cannot remove a stale file from the run directory"))?;
        }
        // The disks by relative names (see the module's header); a stale link is replaced.
        for (link, disk) in [
            (&files.root_link, &cfg.root_disk),
            (&files.work_link, &cfg.work_disk),
        ] {
            process::remove_stale(link)
                .map_err(io("cannot remove a stale disk link from the run directory"))?;
            let target =
                std::path::absolute(disk).map_err(io("cannot make the disk's path absolute"))?;
            fs_err::os::unix::fs::symlink(&target, link)
                .map_err(io("cannot link the disk into the run directory"))?;
        }
        // The logger opens its file without creating it.
        fs_err::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&files.log)
            .map_err(io("cannot create Firecracker's log file"))?;

        // Never `--no-seccomp` or a `--seccomp-filter` of ours: Firecracker's own default
        // filters confine it (the contract test pins this exact command line).
        let mut args: Vec<OsString> = vec!["--api-sock".into(), files.api_socket.clone().into()];
        if is_valid_instance_id(&cfg.name) {
            args.extend(["--id".into(), cfg.name.clone().into()]);
        }
        let spec = SpawnSpec {
            program: self.binary.clone(),
            args,
            log: cfg.console_log.clone(),
            log_mode: LogMode::Append,
            pid_file: files.pid_file.clone(),
            cwd: Some(cfg.run_dir.clone()),
        };
        tracing::info!(vm = %cfg.name, binary = %self.binary.display(), "starting firecracker");
        let spawned = self
            .launcher
            .spawn(&spec)
            .map_err(|source| VmmError::Spawn {
                vm: cfg.name.clone(),
                binary: self.binary.clone(),
                source,
            })?;

        let client = FirecrackerClient::new(&files.api_socket);
        if let Err(e) = wait_ready(cfg, spawned, &client, &files).await {
            let _ = process::terminate(spawned.pid, spawned.start_time, Duration::ZERO).await;
            return Err(e);
        }
        Ok((spawned, client, files))
    }
}

/// The handle of a Firecracker VM whose files are in `run_dir`.
fn handle(name: &str, run_dir: &Path, spawned: Spawned) -> VmHandle {
    let files = Files::new(run_dir);
    VmHandle {
        name: name.to_string(),
        backend: BackendKind::Firecracker,
        pid: spawned.pid,
        pid_start_time: spawned.start_time,
        agent: AgentEndpoint::FirecrackerVsock {
            uds: files.vsock_uds,
            port: AGENT_PORT,
        },
        api_socket: Some(files.api_socket),
        run_dir: run_dir.to_path_buf(),
    }
}

/// Firecracker's `--id`: 1 to 64 characters of `[A-Za-z0-9-]`.
fn is_valid_instance_id(name: &str) -> bool {
    (1..=64).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Waits until the API answers `GET /`, or fails with the exit status and log tails.
async fn wait_ready(
    cfg: &VmConfig,
    spawned: Spawned,
    client: &FirecrackerClient,
    files: &Files,
) -> Result<(), VmmError> {
    let started = Instant::now();
    let quick = client.clone().with_timeout(Duration::from_secs(2));
    let logs = || {
        process::format_logs(&[
            (
                "firecracker output and serial console",
                cfg.console_log.as_path(),
            ),
            ("firecracker log", files.log.as_path()),
        ])
    };
    loop {
        if let Some(status) = process::exit_status_if_gone(spawned.pid, spawned.start_time) {
            return Err(VmmError::ExitedDuringStart {
                vm: cfg.name.clone(),
                backend: BackendKind::Firecracker,
                status,
                logs: logs(),
            });
        }
        if files.api_socket.exists() && quick.describe_instance().await.is_ok() {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(VmmError::NotReady {
                vm: cfg.name.clone(),
                backend: BackendKind::Firecracker,
                socket: files.api_socket.clone(),
                waited: READY_TIMEOUT,
                logs: logs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends the whole pre-boot configuration, in the order Firecracker's docs use.
pub(crate) async fn configure(
    client: &FirecrackerClient,
    cfg: &VmConfig,
    files: &Files,
) -> Result<(), VmmError> {
    let step = |step: &'static str| {
        let vm = cfg.name.clone();
        move |source| VmmError::Api { vm, step, source }
    };
    configure_logger(client, cfg, files).await?;
    client
        .put_machine_config(&MachineConfiguration {
            vcpu_count: cfg.vcpus,
            mem_size_mib: cfg.memory_mib,
            smt: None,
            track_dirty_pages: None,
            huge_pages: None,
        })
        .await
        .map_err(step("setting vCPUs and memory"))?;
    client
        .put_boot_source(&BootSource {
            kernel_image_path: cfg.kernel.clone(),
            initrd_path: cfg.initrd.clone(),
            boot_args: Some(cfg.kernel_args.clone()),
        })
        .await
        .map_err(step("setting the kernel and its command line"))?;
    // The root device is always /dev/vda; Firecracker orders it first.
    for (id, link, root) in [("rootfs", ROOT_LINK, true), ("work", WORK_LINK, false)] {
        client
            .put_drive(&Drive {
                drive_id: id.to_string(),
                path_on_host: PathBuf::from(link),
                is_root_device: root,
                is_read_only: Some(false),
                partuuid: None,
                cache_type: Some(CacheType::Writeback),
                io_engine: None,
            })
            .await
            .map_err(step("attaching a disk"))?;
    }
    if let Some(net) = &cfg.net {
        client
            .put_network_interface(&NetworkInterface {
                iface_id: snapshot::IFACE_ID.to_string(),
                host_dev_name: net.tap.as_str().to_owned(),
                guest_mac: Some(net.mac.to_string()),
                mtu: None,
            })
            .await
            .map_err(step("attaching the network interface"))?;
    }
    client
        .put_vsock(&Vsock {
            guest_cid: cfg.vsock_cid.unwrap_or(DEFAULT_GUEST_CID),
            uds_path: files.vsock_uds.clone(),
        })
        .await
        .map_err(step("attaching the vsock device"))?;
    Ok(())
}

/// Points Firecracker's own log at the run directory: the first request of a start and of a
/// restore (a snapshot load accepts only the logger and metrics before it).
pub(crate) async fn configure_logger(
    client: &FirecrackerClient,
    cfg: &VmConfig,
    files: &Files,
) -> Result<(), VmmError> {
    client
        .put_logger(&Logger {
            log_path: Some(files.log.clone()),
            level: Some(LogLevel::Info),
            show_level: Some(true),
            show_log_origin: None,
            module: None,
        })
        .await
        .map_err(|source| VmmError::Api {
            vm: cfg.name.clone(),
            step: "configuring the logger",
            source,
        })
}

/// Sends Ctrl-Alt-Del (the guest reboots, and Firecracker exits on a guest reboot); false when
/// that failed, so the stop kills at once instead of waiting for a request nobody received.
async fn ask_to_reboot(handle: &VmHandle) -> bool {
    let Some(socket) = &handle.api_socket else {
        return false;
    };
    let client = FirecrackerClient::new(socket).with_timeout(REQUEST_TIMEOUT);
    match client.action(ActionType::SendCtrlAltDel).await {
        Ok(()) => true,
        Err(source) => {
            let e = VmmError::Api {
                vm: handle.name.clone(),
                step: "sending Ctrl-Alt-Del",
                source,
            };
            tracing::warn!(error = %e.report(), "killing Firecracker without a graceful shutdown");
            false
        }
    }
}

impl Vmm for FirecrackerBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Firecracker
    }

    fn fingerprint(&self) -> String {
        format!("firecracker {}", crate::program_stamp(&self.binary))
    }

    fn start<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<VmHandle, VmmError>> {
        Box::pin(self.start_vm(cfg))
    }

    /// `PATCH /vm` Paused, `PUT /snapshot/create` (Full), then `PATCH /vm` Resumed.
    fn snapshot<'a>(
        &'a self,
        handle: &'a VmHandle,
        dest: &'a SnapshotPaths,
        while_paused: WhilePaused<'a>,
    ) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>> {
        Box::pin(self.snapshot_vm(handle, dest, while_paused))
    }

    /// A fresh Firecracker, its logger, then `PUT /snapshot/load` with the new tap and vsock
    /// socket, resuming the guest.
    fn restore<'a>(
        &'a self,
        cfg: &'a VmConfig,
        snapshot: &'a SnapshotPaths,
    ) -> BoxFuture<'a, Result<VmHandle, VmmError>> {
        Box::pin(self.restore_vm(cfg, snapshot))
    }

    /// Firecracker's pid file, and its command line naming the VM's API socket.
    fn leftover(&self, vm: &str, run_dir: &Path) -> Option<VmHandle> {
        let files = Files::new(run_dir);
        let spawned = process::leftover(&files.pid_file, &files.api_socket)?;
        Some(handle(vm, run_dir, spawned))
    }

    /// Ctrl-Alt-Del, then SIGKILL after `graceful`.
    fn stop<'a>(
        &'a self,
        handle: &'a VmHandle,
        graceful: Duration,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(crate::stop_process(handle, graceful, ask_to_reboot(handle)))
    }
}

#[cfg(test)]
mod contract_tests;
