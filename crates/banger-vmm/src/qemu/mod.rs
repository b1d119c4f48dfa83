//! The QEMU backend: `qemu-system-x86_64 -M microvm` with KVM when the host has hardware KVM and
//! TCG otherwise. It owns QEMU's command line ([`args`]), the QMP client used to see that QEMU is
//! up and to power the guest down ([`qmp`]), and QEMU's process lifecycle.
//!
//! Snapshots ([`snapshot`]) are QEMU migrations into a file and back, started through QMP.
//!
//! Per-VM files in `run_dir`: `qmp.sock` (QMP), `agent.sock` (agent's virtio-serial port when
//! there is no vhost-vsock), `qemu.log` (QEMU's own stdout/stderr, rewritten on each start) and
//! `vmm.pid`. The serial console is appended to the configured console log.

mod args;
mod qmp;
mod snapshot;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use args::Accel;
pub use qmp::{Qmp, QmpError};

use crate::host::HostFacts;
use crate::kvm::KvmMode;
use crate::process::{self, Launcher, LogMode, RealLauncher, SpawnSpec, Spawned};
use crate::select::{Availability, Support};
use crate::{
    check_inputs, AgentEndpoint, BackendKind, BoxFuture, SnapshotInfo, SnapshotPaths, VmConfig,
    VmHandle, Vmm, VmmError, WhilePaused, AGENT_PORT, PID_FILE,
};
use args::{AgentChannel, Plan};

/// QEMU's program, looked up on `PATH`.
pub(crate) const PROGRAM: &str = "qemu-system-x86_64";
/// Where to get it, for the message that says it is missing.
const WHERE_TO_GET: &str = "it comes with the Debian package qemu-system-x86";
/// What to do when it is missing.
pub(crate) const INSTALL_HINT: &str = "apt-get install qemu-system-x86 (as root)";

pub(crate) const QMP_SOCKET: &str = "qmp.sock";
pub(crate) const AGENT_SOCKET: &str = "agent.sock";
pub(crate) const QEMU_LOG: &str = "qemu.log";

/// How long QEMU gets to open its QMP socket. TCG on a loaded two-core host is slow to start.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on the graceful-stop request itself (not on the guest's shutdown).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs VMs with `qemu-system-x86_64`.
pub struct QemuBackend {
    binary: PathBuf,
    accel: Accel,
    launcher: Arc<dyn Launcher>,
}

/// What QEMU needs of a host: its program, nothing more. It boots ordinary guests everywhere,
/// with KVM where the host has hardware KVM and under TCG (software emulation) elsewhere.
pub(crate) fn availability(host: &dyn HostFacts) -> Availability {
    let kvm = host.kvm();
    let label = match Accel::for_host(&kvm) {
        Accel::Kvm => "qemu (KVM)",
        Accel::Tcg => "qemu (TCG)",
    };
    let binary = host
        .find_on_path(OsStr::new(PROGRAM))
        .ok_or_else(|| VmmError::BinaryNotFound {
            backend: BackendKind::Qemu,
            binary: PROGRAM.to_string(),
            searched: "searched PATH".to_string(),
            install: WHERE_TO_GET.to_string(),
        });
    Availability {
        kind: BackendKind::Qemu,
        support: Support::Full,
        binary,
        label: label.to_string(),
        kvm,
    }
}

impl Accel {
    /// KVM only when it is hardware KVM.
    fn for_host(kvm: &KvmMode) -> Accel {
        if kvm.is_hardware() {
            Accel::Kvm
        } else {
            Accel::Tcg
        }
    }
}

impl QemuBackend {
    /// `kvm` decides the accelerator: KVM only when it is hardware KVM.
    pub fn new(binary: PathBuf, kvm: KvmMode) -> QemuBackend {
        let accel = Accel::for_host(&kvm);
        QemuBackend {
            binary,
            accel,
            launcher: Arc::new(RealLauncher),
        }
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    async fn start_vm(&self, cfg: &VmConfig) -> Result<VmHandle, VmmError> {
        check_inputs(cfg)?;
        self.launch(cfg, false).await.map(|l| l.handle)
    }

    /// The agent channel and the rest of the command line's host-dependent plan for `cfg`.
    fn plan(&self, cfg: &VmConfig, incoming: bool) -> (Plan, AgentEndpoint) {
        let agent_socket = cfg.run_dir.join(AGENT_SOCKET);
        let (channel, agent) = match cfg.vsock_cid {
            Some(cid) if Path::new("/dev/vhost-vsock").exists() => (
                AgentChannel::Vsock { cid },
                AgentEndpoint::Vsock {
                    cid,
                    port: AGENT_PORT,
                },
            ),
            _ => (
                AgentChannel::VirtioSerial {
                    socket: agent_socket.clone(),
                },
                AgentEndpoint::VirtioSerial {
                    socket: agent_socket,
                },
            ),
        };
        let plan = Plan {
            accel: self.accel,
            agent: channel,
            qmp_socket: cfg.run_dir.join(QMP_SOCKET),
            vhost_net: Path::new("/dev/vhost-net").exists(),
            tsc_khz: host_tsc_khz(),
            incoming,
        };
        (plan, agent)
    }

    /// Spawns QEMU for `cfg` (inputs already checked) and waits until it answers QMP: booting
    /// the guest, or with `incoming` waiting for a state to load. Start and restore share it.
    async fn launch(&self, cfg: &VmConfig, incoming: bool) -> Result<Launched, VmmError> {
        let (plan, agent) = self.plan(cfg, incoming);
        let qmp_socket = plan.qmp_socket.clone();
        let pid_file = cfg.run_dir.join(PID_FILE);
        for stale in [&qmp_socket, &cfg.run_dir.join(AGENT_SOCKET), &pid_file] {
            process::remove_stale(stale).map_err(|source| VmmError::Io {
                vm: cfg.name.clone(),
                action: "cannot remove a stale file from the run directory".into(),
                source,
            })?;
        }
        let argv = args::build_args(cfg, &plan);
        tracing::info!(vm = %cfg.name, command = %args::display(&self.binary, &argv), "starting qemu");

        let log = cfg.run_dir.join(QEMU_LOG);
        let spec = SpawnSpec {
            program: self.binary.clone(),
            args: argv,
            log: log.clone(),
            log_mode: LogMode::Truncate,
            pid_file,
            cwd: None,
        };
        let spawned = self
            .launcher
            .spawn(&spec)
            .map_err(|source| VmmError::Spawn {
                vm: cfg.name.clone(),
                binary: self.binary.clone(),
                source,
            })?;

        if let Err(e) = wait_ready(cfg, spawned, &qmp_socket, &log).await {
            // Never leave a half-started QEMU behind.
            let _ = process::terminate(spawned.pid, spawned.start_time, Duration::ZERO).await;
            return Err(e);
        }
        Ok(Launched {
            handle: handle(&cfg.name, &cfg.run_dir, spawned, agent),
            spawned,
            log,
        })
    }
}

/// A QEMU that [`QemuBackend::launch`] started and that answers QMP.
struct Launched {
    handle: VmHandle,
    spawned: Spawned,
    /// QEMU's own output.
    log: PathBuf,
}

/// The handle of a QEMU VM whose files are in `run_dir`.
fn handle(name: &str, run_dir: &Path, spawned: Spawned, agent: AgentEndpoint) -> VmHandle {
    VmHandle {
        name: name.to_string(),
        backend: BackendKind::Qemu,
        pid: spawned.pid,
        pid_start_time: spawned.start_time,
        agent,
        api_socket: Some(run_dir.join(QMP_SOCKET)),
        run_dir: run_dir.to_path_buf(),
    }
}

/// Waits until QEMU answers QMP, or fails with its exit status and the tails of its logs.
async fn wait_ready(
    cfg: &VmConfig,
    spawned: Spawned,
    qmp_socket: &Path,
    log: &Path,
) -> Result<(), VmmError> {
    let started = Instant::now();
    let logs = || {
        process::format_logs(&[
            ("qemu output", log),
            ("serial console", cfg.console_log.as_path()),
        ])
    };
    loop {
        if let Some(status) = process::exit_status_if_gone(spawned.pid, spawned.start_time) {
            return Err(VmmError::ExitedDuringStart {
                vm: cfg.name.clone(),
                backend: BackendKind::Qemu,
                status,
                logs: logs(),
            });
        }
        if qmp_socket.exists() && Qmp::connect(qmp_socket).await.is_ok() {
            return Ok(());
        }
        if started.elapsed() > READY_TIMEOUT {
            return Err(VmmError::NotReady {
                vm: cfg.name.clone(),
                backend: BackendKind::Qemu,
                socket: qmp_socket.to_path_buf(),
                waited: READY_TIMEOUT,
                logs: logs(),
            });
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn powerdown(socket: &Path) -> Result<(), QmpError> {
    let request = async {
        let mut qmp = Qmp::connect(socket).await?;
        qmp.execute("system_powerdown", None).await.map(|_| ())
    };
    tokio::time::timeout(REQUEST_TIMEOUT, request)
        .await
        .unwrap_or(Err(QmpError::Timeout(REQUEST_TIMEOUT)))
}

/// Asks the guest to power down (the ACPI power button, through QMP); false when that failed,
/// so the stop kills at once instead of waiting for a request nobody received.
async fn ask_to_power_down(handle: &VmHandle) -> bool {
    let Some(socket) = &handle.api_socket else {
        return false;
    };
    match powerdown(socket).await {
        Ok(()) => true,
        Err(e) => {
            let e = VmmError::Qmp {
                vm: handle.name.clone(),
                step: "asking the guest to power down",
                source: e,
            };
            tracing::warn!(error = %e.report(), "killing QEMU without a graceful shutdown");
            false
        }
    }
}

impl Vmm for QemuBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Qemu
    }

    /// The program and the accelerator: a state saved under TCG is not one KVM loads.
    fn fingerprint(&self) -> String {
        format!(
            "qemu {:?} {}",
            self.accel,
            crate::program_stamp(&self.binary)
        )
    }

    fn start<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<VmHandle, VmmError>> {
        Box::pin(self.start_vm(cfg))
    }

    /// `stop`, then a migration into the state file through a descriptor passed over QMP,
    /// then `cont`.
    fn snapshot<'a>(
        &'a self,
        handle: &'a VmHandle,
        dest: &'a SnapshotPaths,
        while_paused: WhilePaused<'a>,
    ) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>> {
        Box::pin(self.snapshot_vm(handle, dest, while_paused))
    }

    /// The boot command line plus `-incoming defer`, then `migrate-incoming` from the state
    /// file through a descriptor passed over QMP.
    fn restore<'a>(
        &'a self,
        cfg: &'a VmConfig,
        snapshot: &'a SnapshotPaths,
    ) -> BoxFuture<'a, Result<VmHandle, VmmError>> {
        Box::pin(self.restore_vm(cfg, snapshot))
    }

    /// QEMU's pid file, and its command line naming the VM's QMP socket.
    fn leftover(&self, vm: &str, run_dir: &Path) -> Option<VmHandle> {
        let spawned = process::leftover(&run_dir.join(PID_FILE), &run_dir.join(QMP_SOCKET))?;
        // Only stopped, never talked to: the agent channel it was given does not matter.
        let agent = AgentEndpoint::VirtioSerial {
            socket: run_dir.join(AGENT_SOCKET),
        };
        Some(handle(vm, run_dir, spawned, agent))
    }

    /// The ACPI power button, then SIGKILL after `graceful`.
    fn stop<'a>(
        &'a self,
        handle: &'a VmHandle,
        graceful: Duration,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(crate::stop_process(
            handle,
            graceful,
            ask_to_power_down(handle),
        ))
    }
}

#[cfg(test)]
mod tests;

/// The host's TSC frequency in kHz, measured once against the monotonic clock (the guest of a
/// TCG VM reads the host's TSC, so this is also the guest's rate).
fn host_tsc_khz() -> Option<u64> {
    static KHZ: std::sync::OnceLock<Option<u64>> = std::sync::OnceLock::new();
    *KHZ.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: rdtsc has no preconditions on x86_64.
            let (t0, c0) = (std::time::Instant::now(), unsafe {
                std::arch::x86_64::_rdtsc()
            });
            std::thread::sleep(std::time::Duration::from_millis(50));
            // SAFETY: as above.
            let (c1, t1) = (
                unsafe { std::arch::x86_64::_rdtsc() },
                std::time::Instant::now(),
            );
            let micros = u64::try_from(t1.duration_since(t0).as_micros()).ok()?;
            let khz = c1.checked_sub(c0)?.checked_mul(1000)? / micros.max(1);
            // Round to a plausible value; anything outside 100 MHz..10 GHz is not a TSC rate.
            (100_000..10_000_000).contains(&khz).then_some(khz)
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            None
        }
    })
}
