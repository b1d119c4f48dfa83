//! banger-vmm owns the virtual machine monitors: one [`Vmm`] trait and two backends behind it,
//! [`firecracker`] (Firecracker's REST API over a Unix socket) and [`qemu`]
//! (`qemu-system-x86_64 -M microvm`, KVM when the host has hardware KVM, TCG otherwise).
//!
//! It starts a VMM process for a [`VmConfig`], hands back a serialisable [`VmHandle`] that outlives
//! the daemon (VMM processes run in their own session and are never children that die with it),
//! and stops it again: a graceful request to the guest, then `SIGKILL` after a grace period.
//! It also decides which backend a host can run ([`select`], [`kvm_mode`]) and connects to the
//! guest agent's channel ([`connect_agent`]).
//!
//! It leaves to its callers everything around the VMM: disks, taps, kernel command lines, VM
//! state and the agent protocol itself.

// Tests may panic on failure; the workspace's unwrap/expect ban is for production code.
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod agent;
mod error;
pub mod firecracker;
mod kvm;
mod process;
pub mod qemu;
mod select;

#[cfg(test)]
mod openapi_check;
#[cfg(test)]
mod testkit;

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use agent::{connect_agent, AgentStream, AGENT_PORT, AGENT_SERIAL_PORT_NAME};
pub use error::VmmError;
pub use kvm::{kvm_mode, KvmMode};
pub use select::{select, Selection, VmmPreference};

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
    pub net: Option<NetConfig>,
    /// Guest CID for host vsock (`vhost-vsock`). QEMU uses vsock for the agent only when this is
    /// set and the host has `/dev/vhost-vsock`; it must then be unique among running VMs and at
    /// least 3. Firecracker's vsock is a per-VM Unix-socket bridge and uses 3 when this is `None`.
    pub vsock_cid: Option<u32>,
    /// Per-VM directory (must exist) for the API socket, agent socket, pid file and VMM log.
    pub run_dir: PathBuf,
    /// The serial console is appended to this file.
    pub console_log: PathBuf,
}

/// The tap device and guest MAC of the VM's one network interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// Name of an existing tap device on the host.
    pub tap: String,
    /// Guest MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
}

/// Which VMM runs a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Firecracker,
    Qemu,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Firecracker => "firecracker",
            BackendKind::Qemu => "qemu",
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

/// One VMM backend.
pub trait Vmm: Send + Sync {
    fn kind(&self) -> BackendKind;
    /// Starts the VMM and boots the guest; returns once the VMM runs and answers on its control
    /// socket (not when the guest is up: that is the agent's job to report).
    fn start<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<VmHandle, VmmError>>;
    /// Asks the guest to shut down, waits up to `graceful`, then kills the VMM and waits until
    /// the process is gone. Stopping a VMM that is already gone succeeds.
    fn stop<'a>(
        &'a self,
        handle: &'a VmHandle,
        graceful: Duration,
    ) -> BoxFuture<'a, Result<(), VmmError>>;
}

/// True when the handle's process exists, is not a zombie, and is the same process (same start
/// time) as when it was started. Reaps the process if it is a zombie child of ours.
pub fn is_alive(handle: &VmHandle) -> bool {
    process::is_alive(handle.pid, handle.pid_start_time)
}

/// Resolves once the VMM process has exited (and, if it is our child, been reaped), with a
/// description of how it ended (`exit status 0`, `killed by SIGKILL`, or `exit status unknown`
/// for a process that is not our child). For supervising a VM whose guest may power off or
/// reboot by itself; without it (or [`is_alive`] calls) such a child stays a zombie.
pub async fn wait_for_exit(handle: &VmHandle) -> String {
    loop {
        if let Some(status) = process::exit_status_if_gone(handle.pid, handle.pid_start_time) {
            return status;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Stops a VM by its handle, whichever backend started it (e.g. after the configured backend
/// changed across a daemon restart). Same contract as [`Vmm::stop`].
pub async fn stop(handle: &VmHandle, graceful: Duration) -> Result<(), VmmError> {
    match handle.backend {
        BackendKind::Qemu => qemu::stop(handle, graceful).await,
        BackendKind::Firecracker => firecracker::stop(handle, graceful).await,
    }
}

/// The shared tail of both backends' stop: wait for the graceful request to take effect, kill,
/// wait until the process is gone, and remove the run directory's pid file and sockets.
async fn finish_stop(handle: &VmHandle, grace: Duration) -> Result<(), VmmError> {
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
    if let Some(net) = &cfg.net {
        net.validate().map_err(|reason| VmmError::InvalidConfig {
            vm: cfg.name.clone(),
            reason,
        })?;
    }
    Ok(())
}

impl NetConfig {
    /// Checks the tap name (a Linux interface name) and the MAC (`aa:bb:cc:dd:ee:ff`).
    pub fn validate(&self) -> Result<(), String> {
        let tap_ok = !self.tap.is_empty()
            && self.tap.len() <= 15
            && self
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.');
        if !tap_ok {
            return Err(format!(
                "tap name {:?} is not a valid interface name (1-15 of [A-Za-z0-9._-])",
                self.tap
            ));
        }
        let parts: Vec<&str> = self.mac.split(':').collect();
        let mac_ok = parts.len() == 6
            && parts
                .iter()
                .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
        if !mac_ok {
            return Err(format!(
                "MAC {:?} is not of the form aa:bb:cc:dd:ee:ff",
                self.mac
            ));
        }
        Ok(())
    }
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
        assert_eq!(wait_for_exit(&h).await, "exit status 7");
        assert!(!is_alive(&h));
        assert!(process::proc_stat(h.pid).is_none(), "not reaped");
    }

    #[tokio::test]
    async fn stop_without_a_control_socket_kills_at_once_and_cleans_up() {
        let dir = tempfile::tempdir().unwrap();
        let h = handle_for(&["-c", "exec sleep 300"], dir.path());
        let _guard = ProcessGuard::new(h.pid, h.pid_start_time);
        std::fs::write(dir.path().join("agent.sock"), "").unwrap();
        let t = std::time::Instant::now();
        stop(&h, Duration::from_secs(30)).await.unwrap();
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "waited for a grace period nobody asked for"
        );
        assert!(!is_alive(&h));
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

    #[test]
    fn net_config_validation() {
        let ok = NetConfig {
            tap: "tap-vm_1.0".into(),
            mac: "06:00:AC:10:00:02".into(),
        };
        assert_eq!(ok.validate(), Ok(()));
        for (tap, mac) in [
            ("", "06:00:ac:10:00:02"),
            ("a-very-long-tap-name", "06:00:ac:10:00:02"),
            ("tap 0", "06:00:ac:10:00:02"),
            ("tap0", "06:00:ac:10:00"),
            ("tap0", "06-00-ac-10-00-02"),
            ("tap0", "06:00:ac:10:00:2"),
        ] {
            let n = NetConfig {
                tap: tap.into(),
                mac: mac.into(),
            };
            assert!(n.validate().is_err(), "{tap:?} {mac:?} accepted");
        }
    }
}
