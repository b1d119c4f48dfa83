//! Snapshot and restore of a QEMU VM: a migration of the paused VM into a file, and a new QEMU
//! that loads it.
//!
//! QEMU 7.2 has no `file:` migration and runs under `-sandbox ...,spawn=deny` (no `exec:`), so
//! banger opens the state file itself and hands the descriptor to QEMU over QMP (`getfd`, then
//! the URI `fd:NAME`), both ways. The save: `stop`, `migrate` (unthrottled: nothing changes in a
//! paused guest), poll `query-migrate` until it is done, then what every backend does
//! (`crate::snapshot::after_save`: fsync, the caller's work, the manifest), and `cont` over a
//! fresh QMP session (also after any failure, so the guest never
//! stays paused because a step failed). QEMU finishes a migration by flushing and inactivating
//! the disks, and `cont` activates them again, so a copy made while paused sees every write.
//!
//! The restore: the boot command line plus `-incoming defer` (see [`super::args`]), then
//! `migrate-incoming`, polling `query-status`. The loaded VM takes the run state it was saved
//! with, paused, so `cont` starts it. QEMU exits when a load fails (7.2 cannot be told
//! otherwise), which is reported with its log.

use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::args::{self, Plan};
use super::{Launched, QemuBackend, Qmp, QmpError};
use crate::snapshot::{after_save, conclude, remove_partial, require_fresh};
use crate::{
    check_inputs, process, AgentEndpoint, BackendKind, Manifest, Shape, SnapshotInfo,
    SnapshotPaths, VmConfig, VmHandle, VmmError, WhilePaused,
};

/// The name the state file's descriptor has inside QEMU.
const FD_NAME: &str = "banger-state";
/// Bound on writing the state (memory size over disk speed, with room for a busy host).
const SAVE_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on loading it: QEMU reads the whole file before it answers QMP again.
const LOAD_TIMEOUT: Duration = Duration::from_secs(300);
/// QEMU 7.2 caps migrations at 32 MiB/s by default, which would make a 512 MiB VM pause for
/// seconds; a paused guest dirties nothing, so the cap buys nothing. 1 TiB/s is "none".
const NO_BANDWIDTH_CAP: u64 = 1 << 40;
const POLL: Duration = Duration::from_millis(20);

impl QemuBackend {
    pub(super) async fn snapshot_vm(
        &self,
        handle: &VmHandle,
        dest: &SnapshotPaths,
        while_paused: WhilePaused<'_>,
    ) -> Result<SnapshotInfo, VmmError> {
        let vm = handle.name.as_str();
        let qmp_err = |step: &'static str| {
            move |source| VmmError::Qmp {
                vm: vm.to_string(),
                step,
                source,
            }
        };
        let socket = handle.control_socket()?;
        require_fresh(dest, vm)?;
        let mut qmp = Qmp::connect(socket)
            .await
            .map_err(qmp_err("connecting for a snapshot"))?;
        let shape = self.running_shape(&mut qmp, handle).await?;
        qmp.execute(
            "migrate-set-parameters",
            Some(json!({ "max-bandwidth": NO_BANDWIDTH_CAP })),
        )
        .await
        .map_err(qmp_err("lifting the migration bandwidth cap"))?;

        let state_path = dest.state();
        // The state holds the guest's memory, secrets and all: for the owner's eyes only.
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&state_path)
            .map_err(|source| VmmError::Io {
                vm: vm.to_string(),
                action: format!("cannot create the state file {}", state_path.display()),
                source,
            })?;

        let paused_at = Instant::now();
        if let Err(e) = qmp.execute("stop", None).await {
            remove_partial(dest, vm);
            return Err(qmp_err("pausing the guest")(e));
        }
        let saved = async {
            save_state(&mut qmp, &file, vm, &state_path).await?;
            after_save(
                vm,
                dest,
                std::slice::from_ref(&state_path),
                shape,
                paused_at,
                while_paused,
            )
            .await
        }
        .await;
        drop(file);
        // A fresh session: after a failed or timed-out exchange the old one may be out of step.
        drop(qmp);
        let resumed = resume(socket).await.map_err(qmp_err("resuming the guest"));
        conclude(vm, dest, saved, resumed, paused_at)
    }

    /// The shape of a running VM, asked of QEMU itself rather than taken from its config: the
    /// state describes the machine as it runs.
    async fn running_shape(&self, qmp: &mut Qmp, handle: &VmHandle) -> Result<Shape, VmmError> {
        let step = |step: &'static str| {
            let vm = handle.name.clone();
            move |source| VmmError::Qmp { vm, step, source }
        };
        let cpus = qmp
            .execute("query-cpus-fast", None)
            .await
            .map_err(step("counting the vCPUs"))?;
        let memory = qmp
            .execute("query-memory-size-summary", None)
            .await
            .map_err(step("reading the memory size"))?;
        let nics = qmp
            .execute("query-rx-filter", None)
            .await
            .map_err(step("listing the network interfaces"))?;
        let unexpected = |what: &str, v: &Value| VmmError::Qmp {
            vm: handle.name.clone(),
            step: "reading the VM's shape",
            source: QmpError::Protocol(format!("unexpected {what} reply {v}")),
        };
        let vcpus = cpus
            .as_array()
            .and_then(|a| u32::try_from(a.len()).ok())
            .ok_or_else(|| unexpected("query-cpus-fast", &cpus))?;
        let memory_mib = memory
            .get("base-memory")
            .and_then(Value::as_u64)
            .and_then(|b| u32::try_from(b >> 20).ok())
            .ok_or_else(|| unexpected("query-memory-size-summary", &memory))?;
        let network = !nics
            .as_array()
            .ok_or_else(|| unexpected("query-rx-filter", &nics))?
            .is_empty();
        let vsock = matches!(handle.agent, AgentEndpoint::Vsock { .. });
        Ok(Shape {
            backend: BackendKind::Qemu,
            vcpus,
            memory_mib,
            network,
            layout: args::layout(self.accel, vsock),
        })
    }

    pub(super) async fn restore_vm(
        &self,
        cfg: &VmConfig,
        snapshot: &SnapshotPaths,
    ) -> Result<VmHandle, VmmError> {
        check_inputs(cfg)?;
        let manifest = Manifest::read(snapshot, &cfg.name)?;
        let (plan, _) = self.plan(cfg, true);
        manifest
            .shape
            .require_equal(&config_shape(cfg, &plan), &cfg.name, &snapshot.manifest())?;
        let state_path = snapshot.state();
        let state = fs_err::File::open(&state_path)
            .map_err(|source| VmmError::Io {
                vm: cfg.name.clone(),
                action: format!("cannot open the state file {}", state_path.display()),
                source,
            })?
            .into_file();

        let launched = self.launch(cfg, true).await?;
        let t = Instant::now();
        if let Err(e) = load_state(cfg, &launched, &state, &state_path).await {
            // Never leave a QEMU behind that waits for a state or runs a half-loaded one.
            let spawned = launched.spawned;
            let _ = process::terminate(spawned.pid, spawned.start_time, Duration::ZERO).await;
            return Err(e);
        }
        tracing::info!(vm = %cfg.name, loading = ?t.elapsed(), "restored from a snapshot");
        Ok(launched.handle)
    }
}

/// The shape a VM started for `cfg` with `plan` has. The MAC is not part of it: virtio-net's
/// saved state carries the MAC the guest had, so a restored guest keeps using its old MAC
/// (whatever `cfg.net` says) until something inside it sets the new one.
fn config_shape(cfg: &VmConfig, plan: &Plan) -> Shape {
    Shape {
        backend: BackendKind::Qemu,
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        network: cfg.net.is_some(),
        layout: plan.layout(),
    }
}

/// Migrates the paused VM into `file` and waits until QEMU is done with it.
async fn save_state(
    qmp: &mut Qmp,
    file: &std::fs::File,
    vm: &str,
    path: &Path,
) -> Result<(), VmmError> {
    let qmp_err = |step: &'static str| {
        move |source| VmmError::Qmp {
            vm: vm.to_string(),
            step,
            source,
        }
    };
    let failed = |reason: String| VmmError::SaveState {
        vm: vm.to_string(),
        path: path.to_path_buf(),
        reason,
    };
    qmp.send_fd(FD_NAME, file.as_fd())
        .await
        .map_err(qmp_err("handing the state file to QEMU"))?;
    if let Err(e) = qmp
        .execute("migrate", Some(json!({ "uri": format!("fd:{FD_NAME}") })))
        .await
    {
        // QEMU keeps a named descriptor until told otherwise; it would hold the file open.
        let _ = qmp
            .execute("closefd", Some(json!({ "fdname": FD_NAME })))
            .await;
        return Err(qmp_err("starting to save the state")(e));
    }
    let started = Instant::now();
    loop {
        let info = qmp
            .execute("query-migrate", None)
            .await
            .map_err(qmp_err("waiting for the state to be saved"))?;
        match info.get("status").and_then(Value::as_str) {
            Some("completed") => return Ok(()),
            Some(status @ ("failed" | "cancelled")) => {
                let reason = info
                    .get("error-desc")
                    .and_then(Value::as_str)
                    .map_or_else(|| format!("migration {status}"), str::to_string);
                return Err(failed(reason));
            }
            _ => {}
        }
        if started.elapsed() > SAVE_TIMEOUT {
            let _ = qmp.execute("migrate_cancel", None).await;
            return Err(failed(format!("not done within {SAVE_TIMEOUT:?}")));
        }
        tokio::time::sleep(POLL).await;
    }
}

/// Resumes the guest over a new QMP session.
async fn resume(socket: &Path) -> Result<(), QmpError> {
    let mut qmp = Qmp::connect(socket).await?;
    qmp.execute("cont", None).await.map(|_| ())
}

/// Feeds `state` to a QEMU waiting with `-incoming defer` and waits until the guest runs.
async fn load_state(
    cfg: &VmConfig,
    launched: &Launched,
    state: &std::fs::File,
    path: &Path,
) -> Result<(), VmmError> {
    let vm = cfg.name.as_str();
    let qmp_err = |step: &'static str| {
        move |source| VmmError::Qmp {
            vm: vm.to_string(),
            step,
            source,
        }
    };
    let failed = |reason: String| VmmError::LoadState {
        vm: vm.to_string(),
        path: path.to_path_buf(),
        reason,
        logs: process::format_logs(&[("qemu output", launched.log.as_path())]),
    };
    let socket = launched
        .handle
        .api_socket
        .as_deref()
        .unwrap_or(Path::new(super::QMP_SOCKET));
    let mut qmp = Qmp::connect(socket)
        .await
        .map_err(qmp_err("connecting to load the state"))?;
    qmp.set_reply_timeout(LOAD_TIMEOUT);
    qmp.send_fd(FD_NAME, state.as_fd())
        .await
        .map_err(qmp_err("handing the state file to QEMU"))?;
    qmp.execute(
        "migrate-incoming",
        Some(json!({ "uri": format!("fd:{FD_NAME}") })),
    )
    .await
    .map_err(qmp_err("starting to load the state"))?;
    let spawned = launched.spawned;
    let started = Instant::now();
    loop {
        match qmp.execute("query-status", None).await {
            Ok(status) => match status.get("status").and_then(Value::as_str) {
                Some("running") => return Ok(()),
                // The state was saved from a paused guest, and QEMU restores the run state it
                // was saved with rather than starting the guest: start it here.
                Some("paused") => {
                    qmp.execute("cont", None)
                        .await
                        .map_err(qmp_err("starting the restored guest"))?;
                }
                _ => {}
            },
            Err(e) => {
                // QEMU exits when a load fails: its own message says why.
                for _ in 0..100 {
                    if let Some(status) =
                        process::exit_status_if_gone(spawned.pid, spawned.start_time)
                    {
                        return Err(failed(format!("QEMU exited ({status})")));
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                return Err(qmp_err("waiting for the state to load")(e));
            }
        }
        if started.elapsed() > LOAD_TIMEOUT {
            return Err(failed(format!("not running within {LOAD_TIMEOUT:?}")));
        }
        tokio::time::sleep(POLL).await;
    }
}
