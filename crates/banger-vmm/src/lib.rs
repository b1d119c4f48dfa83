//! banger-vmm owns the virtual machine monitors: one [`Vmm`] trait and two backends behind it,
//! [`firecracker`] (Firecracker's REST API over a Unix socket) and [`qemu`]
//! (`qemu-system-x86_64 -M microvm`, KVM when the host has hardware KVM, TCG otherwise).
//!
//! A backend starts a VMM process for a [`VmConfig`] (booting it, or restoring a snapshot that
//! [`Vmm::snapshot`] took: the `snapshot` module holds what backends share there), hands back a
//! serialisable [`VmHandle`] that outlives the daemon (VMM processes run in their own session and
//! are never children that die with it), tells whether it still runs, opens the guest agent's
//! channel, and stops it again: a graceful request to the guest, then `SIGKILL` after a grace
//! period. Each backend module also
//! says whether a host can run it and why not ([`BackendKind::availability`]); [`select`] turns
//! that and the user's `vmm` setting into the one choice the daemon and `banger doctor` share,
//! and [`Backends`] is what the daemon keeps of it. A third backend is one more module and one
//! more [`BackendKind`] variant. With the `testkit` feature, [`testkit::FakeVmm`] stands in for
//! a real one in the daemon's tests.
//!
//! It leaves to its callers everything around the VMM: disks, taps, kernel command lines, VM
//! state and the agent protocol itself.

// Tests may panic on failure; the workspace's unwrap/expect ban is for production code.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod agent;
mod error;
pub mod firecracker;
mod host;
mod kvm;
mod process;
pub mod qemu;
mod select;
mod snapshot;

#[cfg(test)]
mod openapi_check;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use banger_net::{Mac, TapName};
use serde::{Deserialize, Serialize};

pub use agent::{connect_agent, AgentStream, AGENT_PORT, AGENT_SERIAL_PORT_NAME};
pub use error::VmmError;
pub use host::{HostFacts, SystemHost};
pub use kvm::{kvm_mode, kvm_mode_of, KvmMode};
pub use select::{select, Availability, Backends, Choice, Support, VmmSettings};
pub use snapshot::{Manifest, ManifestError, Shape, SnapshotInfo, SnapshotPaths, WhilePaused};

/// The crate's error types that carry hints, for a [`banger_hint::Report`] of an error chain.
/// Every type here that implements [`banger_hint::Hint`] must be listed: Rust cannot enumerate a
/// trait's implementations.
pub const HINTS: &[banger_hint::Probe] = &[banger_hint::probe::<VmmError>];

/// Name of the pid file each backend writes into the VM's run directory.
pub const PID_FILE: &str = "vmm.pid";

/// A boxed future as the trait methods return it, so `dyn Vmm` stays object safe.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Everything a backend needs to start one VM. The caller owns every path in it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmConfig {
    /// VM name, used in error messages and as the VMM's process/instance name.
    pub name: String,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// The full kernel command line, built by the caller.
    pub kernel_args: String,
    /// The guest's `/dev/vda`, attached read-write.
    pub root_disk: PathBuf,
    /// The guest's `/dev/vdb`, attached read-write.
    pub work_disk: PathBuf,
    pub net: Option<Nic>,
    /// Guest CID for host vsock (`vhost-vsock`). QEMU uses vsock for the agent only when this is
    /// set and the host has `/dev/vhost-vsock`; it must then be unique among running VMs and at
    /// least 3. Firecracker's vsock is a per-VM Unix-socket bridge and uses 3 when this is `None`.
    pub vsock_cid: Option<u32>,
    /// Per-VM directory (must exist) for the API socket, agent socket, pid file and VMM log.
    pub run_dir: PathBuf,
    /// The serial console is appended to this file.
    pub console_log: PathBuf,
}

/// The VM's one network interface: an existing tap on the host and the guest's MAC, both
/// checked where they were made (banger-net's types), so a backend passes them on as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nic {
    pub tap: TapName,
    pub mac: Mac,
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Firecracker,
    Qemu,
}

impl BackendKind {
    /// Every backend, in the order `vmm = "auto"` prefers them.
    pub const ALL: [BackendKind; 2] = [BackendKind::Firecracker, BackendKind::Qemu];

    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
        }
    }

    /// Whether `host` can run this backend, with the program `settings` point to, and if not,
    /// why: the backend module's own judgement.
    pub fn availability(self, host: &dyn HostFacts, settings: &VmmSettings) -> Availability {
        match self {
            BackendKind::Firecracker => firecracker::availability(host, settings),
            BackendKind::Qemu => qemu::availability(host),
        }
    }

    /// The backend, running `binary`, on a host with `kvm`.
    pub(crate) fn backend(self, binary: PathBuf, kvm: KvmMode) -> Arc<dyn Vmm> {
        match self {
            BackendKind::Firecracker => Arc::new(firecracker::FirecrackerBackend::new(binary)),
            BackendKind::Qemu => Arc::new(qemu::QemuBackend::new(binary, kvm)),
        }
    }

    /// The program's usual name, looked up on `PATH` unless configured otherwise.
    pub(crate) fn program(self) -> &'static str {
        match self {
            BackendKind::Firecracker => firecracker::PROGRAM,
            BackendKind::Qemu => qemu::PROGRAM,
        }
    }

    /// What to do when the program is missing.
    pub fn install_hint(self) -> &'static str {
        match self {
            BackendKind::Firecracker => firecracker::INSTALL_HINT,
            BackendKind::Qemu => qemu::INSTALL_HINT,
        }
    }
}

impl std::fmt::Display for BackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where the host reaches the guest agent; [`connect_agent`] opens it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum AgentEndpoint {
    /// QEMU `virtserialport` named [`AGENT_SERIAL_PORT_NAME`], served on this host socket
    /// (the guest sees `/dev/virtio-ports/banger.agent`).
    VirtioSerial { socket: PathBuf },
    /// Firecracker's vsock bridge: connect to `uds`, send `CONNECT <port>\n`, read `OK <n>\n`.
    FirecrackerVsock { uds: PathBuf, port: u32 },
    /// Host vsock (`AF_VSOCK`) to the guest's CID.
    Vsock { cid: u32, port: u32 },
}

/// A running VMM, as the daemon persists it to re-adopt the process after a restart.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmHandle {
    pub name: String,
    pub backend: BackendKind,
    pub pid: i32,
    /// Start time of `pid` from `/proc/<pid>/stat` (clock ticks since boot); a process with the
    /// same pid but another start time is not this VMM.
    pub pid_start_time: u64,
    pub agent: AgentEndpoint,
    /// QMP socket (QEMU) or API socket (Firecracker), used for the graceful stop.
    pub api_socket: Option<PathBuf>,
    pub run_dir: PathBuf,
}

impl VmHandle {
    /// The VMM's control socket (QEMU's QMP, Firecracker's API), which snapshots need; a
    /// handle without one is refused naming the VM.
    pub(crate) fn control_socket(&self) -> Result<&Path, VmmError> {
        self.api_socket
            .as_deref()
            .ok_or_else(|| VmmError::InvalidConfig {
                vm: self.name.clone(),
                reason: format!("its handle names no {} control socket", self.backend),
            })
    }
}

/// One VMM backend: the whole of what the daemon needs from a VMM.
pub trait Vmm: Send + Sync {
    fn kind(&self) -> BackendKind;

    /// Starts the VMM and boots the guest; returns once the VMM runs and answers on its control
    /// socket (not when the guest is up: that is the agent's job to report).
    fn start<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<VmHandle, VmmError>>;

    /// Asks the guest to shut down, waits up to `graceful`, then kills the VMM and waits until
    /// the process is gone. Stopping a VMM that is already gone succeeds. Works for any handle
    /// of this backend's kind, including one an earlier daemon started.
    fn stop<'a>(
        &'a self,
        handle: &'a VmHandle,
        graceful: Duration,
    ) -> BoxFuture<'a, Result<(), VmmError>>;

    /// Takes a snapshot of a running VM into `dest`: pauses the guest, saves the VMM's state
    /// (devices and memory), runs `while_paused` (the caller copies the disks there, so they
    /// agree with the saved memory), writes the manifest, and resumes the guest. The guest is
    /// resumed whatever failed, and on failure nothing this call wrote is left in `dest`.
    /// Refuses to overwrite a snapshot already in `dest`.
    fn snapshot<'a>(
        &'a self,
        handle: &'a VmHandle,
        dest: &'a SnapshotPaths,
        while_paused: WhilePaused<'a>,
    ) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>>;

    /// Starts a new VMM for `cfg` (its own run directory, disks, tap and MAC) from the state in
    /// `snapshot`; the guest runs on from where it was paused when this returns. `cfg` must have
    /// the snapshot's shape (vCPUs, memory, network interface or not): checked against the
    /// manifest before any VMM starts. The kernel and command line in `cfg` are not booted.
    fn restore<'a>(
        &'a self,
        cfg: &'a VmConfig,
        snapshot: &'a SnapshotPaths,
    ) -> BoxFuture<'a, Result<VmHandle, VmmError>>;

    /// A VMM of this backend that was started for `vm` in `run_dir` but never recorded: the
    /// daemon died between starting it and writing its handle down. Found so that it can be
    /// stopped; `None` when there is none.
    fn leftover(&self, vm: &str, run_dir: &Path) -> Option<VmHandle>;

    /// What a snapshot this backend takes depends on beyond the VM's shape: the program (its
    /// path, size and modification time) and how it runs guests. The daemon keeps a warm
    /// snapshot only while this stays the same: a new VMM may not load an older one's state.
    fn fingerprint(&self) -> String {
        self.kind().as_str().to_owned()
    }

    /// True when the handle's VMM still runs. For a backend that runs a host process (both do),
    /// that is the same process (pid and start time) as when it started, not a zombie; a zombie
    /// child of ours is reaped. Blocking but quick (reads `/proc`).
    fn is_alive(&self, handle: &VmHandle) -> bool {
        process::is_alive(handle.pid, handle.pid_start_time)
    }

    /// Resolves once the VMM has exited (and, if it is our child, been reaped), with how it ended
    /// (`exit status 0`, `killed by SIGKILL`, or `exit status unknown` for a process that is not
    /// our child).
    fn wait_for_exit<'a>(&'a self, handle: &'a VmHandle) -> BoxFuture<'a, String> {
        Box::pin(async move {
            loop {
                if let Some(status) =
                    process::exit_status_if_gone(handle.pid, handle.pid_start_time)
                {
                    return status;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    }

    /// Opens a byte stream to the guest agent over the channel the VMM gave the guest. Fails
    /// fast (a few seconds at most); a caller waiting for the guest to come up retries.
    fn connect_agent<'a>(
        &'a self,
        handle: &'a VmHandle,
    ) -> BoxFuture<'a, Result<AgentStream, VmmError>> {
        Box::pin(connect_agent(&handle.agent))
    }
}

/// `PATH SIZE MTIME` of a program, for [`Vmm::fingerprint`]; the path alone when it cannot be
/// read (the VMM would not start either).
pub(crate) fn program_stamp(path: &Path) -> String {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(path) {
        Ok(m) => format!(
            "{} {} {}.{}",
            path.display(),
            m.len(),
            m.mtime(),
            m.mtime_nsec()
        ),
        Err(_) => path.display().to_string(),
    }
}

/// How every backend that runs a host process stops it: nothing to do when it is gone already;
/// otherwise `ask` the guest to shut down (the backend's own way; `false` when that failed), wait
/// up to `graceful` for the process to exit (not at all when the request failed), kill it, and
/// remove the run directory's pid file and sockets.
async fn stop_process(
    handle: &VmHandle,
    graceful: Duration,
    ask: impl Future<Output = bool>,
) -> Result<(), VmmError> {
    if !process::is_alive(handle.pid, handle.pid_start_time) {
        cleanup_run_dir(handle);
        return Ok(());
    }
    let grace = if ask.await { graceful } else { Duration::ZERO };
    let ended = process::terminate(handle.pid, handle.pid_start_time, grace)
        .await
        .map_err(|source| VmmError::Stop {
            vm: handle.name.clone(),
            pid: handle.pid,
            source,
        })?;
    match ended {
        process::Ended::ByItself => {
            tracing::info!(vm = %handle.name, pid = handle.pid, "VMM exited")
        }
        process::Ended::Killed => {
            tracing::info!(vm = %handle.name, pid = handle.pid, "VMM killed after {grace:?}")
        }
        process::Ended::Stuck => {
            return Err(VmmError::StillRunning {
                vm: handle.name.clone(),
                pid: handle.pid,
                waited: process::KILL_WAIT,
            })
        }
    }
    cleanup_run_dir(handle);
    Ok(())
}

/// Removes what a stopped VMM leaves in its run directory, so the next start finds no stale
/// sockets. The caller's own files there are left alone.
fn cleanup_run_dir(handle: &VmHandle) {
    let mut files = vec![handle.run_dir.join(PID_FILE)];
    files.extend(handle.api_socket.iter().cloned());
    match &handle.agent {
        AgentEndpoint::VirtioSerial { socket } => files.push(socket.clone()),
        AgentEndpoint::FirecrackerVsock { uds, .. } => files.push(uds.clone()),
        AgentEndpoint::Vsock { .. } => {}
    }
    for f in files {
        if let Err(e) = process::remove_stale(&f) {
            tracing::warn!(vm = %handle.name, error = %e, "cannot clean up after the VMM");
        }
    }
}

/// Fails early, with the path, when an input file of the VM is missing.
fn check_inputs(cfg: &VmConfig) -> Result<(), VmmError> {
    let mut files: Vec<(&str, &Path)> = vec![
        ("kernel", &cfg.kernel),
        ("root disk", &cfg.root_disk),
        ("work disk", &cfg.work_disk),
    ];
    if let Some(initrd) = &cfg.initrd {
        files.push(("initrd", initrd));
    }
    for (what, path) in files {
        if !path.is_file() {
            return Err(VmmError::MissingInput {
                vm: cfg.name.clone(),
                what,
                path: path.to_path_buf(),
            });
        }
    }
    if !cfg.run_dir.is_dir() {
        return Err(VmmError::MissingInput {
            vm: cfg.name.clone(),
            what: "run directory",
            path: cfg.run_dir.clone(),
        });
    }
    if cfg.vcpus == 0 || cfg.memory_mib == 0 {
        return Err(VmmError::InvalidConfig {
            vm: cfg.name.clone(),
            reason: format!(
                "vcpus ({}) and memory_mib ({}) must both be at least 1",
                cfg.vcpus, cfg.memory_mib
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::{spawn_detached, LogMode, SpawnSpec};
    use crate::testkit::ProcessGuard;

    fn handle_for(args: &[&str], dir: &Path) -> VmHandle {
        let spawned = spawn_detached(&SpawnSpec {
            program: "sh".into(),
            args: args.iter().map(Into::into).collect(),
            log: dir.join("out.log"),
            log_mode: LogMode::Truncate,
            pid_file: dir.join(PID_FILE),
            cwd: None,
        })
        .unwrap();
        VmHandle {
            name: "t".into(),
            backend: BackendKind::Qemu,
            pid: spawned.pid,
            pid_start_time: spawned.start_time,
            agent: AgentEndpoint::VirtioSerial {
                socket: dir.join("agent.sock"),
            },
            api_socket: None,
            run_dir: dir.to_path_buf(),
        }
    }

    #[tokio::test]
    async fn wait_for_exit_reports_how_a_vmm_ended_and_reaps_it() {
        let dir = tempfile::tempdir().unwrap();
        let h = handle_for(&["-c", "sleep 0.2; exit 7"], dir.path());
        let _guard = ProcessGuard::new(h.pid, h.pid_start_time);
        let qemu = qemu::QemuBackend::new(PathBuf::from(qemu::PROGRAM), KvmMode::Absent);
        assert_eq!(qemu.wait_for_exit(&h).await, "exit status 7");
        assert!(!qemu.is_alive(&h));
        assert!(process::proc_stat(h.pid).is_none(), "not reaped");
    }

    #[tokio::test]
    async fn stop_without_a_control_socket_kills_at_once_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let h = handle_for(&["-c", "exec sleep 300"], dir.path());
        let _guard = ProcessGuard::new(h.pid, h.pid_start_time);
        std::fs::write(dir.path().join("agent.sock"), "").unwrap();
        let t = std::time::Instant::now();
        let qemu = qemu::QemuBackend::new(PathBuf::from(qemu::PROGRAM), KvmMode::Absent);
        qemu.stop(&h, Duration::from_secs(30)).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "waited for a grace period nobody asked for"
        );
        assert!(!qemu.is_alive(&h));
        assert!(!dir.path().join(PID_FILE).exists());
        assert!(!dir.path().join("agent.sock").exists());
    }

    #[test]
    fn handle_serialises_as_the_daemon_persists_it() {
        let h = VmHandle {
            name: "sandbox".into(),
            backend: BackendKind::Firecracker,
            pid: 42,
            pid_start_time: 7,
            agent: AgentEndpoint::FirecrackerVsock {
                uds: "/run/v.sock".into(),
                port: 1024,
            },
            api_socket: Some("/run/fc.sock".into()),
            run_dir: "/run".into(),
        };
        let json = serde_json::to_value(&h).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "name": "sandbox", "backend": "firecracker", "pid": 42, "pid_start_time": 7,
                "agent": {"kind": "firecracker_vsock", "uds": "/run/v.sock", "port": 1024},
                "api_socket": "/run/fc.sock", "run_dir": "/run"
            })
        );
        assert_eq!(serde_json::from_value::<VmHandle>(json).unwrap(), h);
    }
}
