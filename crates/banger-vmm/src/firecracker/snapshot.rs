//! Snapshot and restore of a Firecracker VM through its API: `PATCH /vm` Paused,
//! `PUT /snapshot/create` (a Full snapshot: device state in [`SnapshotPaths::state`], guest
//! memory in [`SnapshotPaths::memory`]), what every backend does while paused
//! (`crate::snapshot::after_save`), then `PATCH /vm` Resumed, also after any failure.
//!
//! A restore is a fresh Firecracker that gets its logger and then `PUT /snapshot/load`, which
//! Firecracker accepts only before anything else is configured: memory from the file, the new
//! VM's tap in place of the old one (`network_overrides`), its own vsock socket
//! (`vsock_override`), kvmclock advanced by the time the snapshot slept (`clock_realtime`), and
//! the guest resumed. Firecracker reopens the disks by the names the snapshot recorded (its API
//! has no override for drives): relative names of links in the run directory, which the restored
//! VM's launch points at its own disks.
//!
//! Firecracker cannot run on the development host (no hardware KVM): the contract tests check
//! every request against the OpenAPI description instead.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{
    configure_logger, handle, FirecrackerBackend, FirecrackerClient, MemoryBackend,
    MemoryBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams, SnapshotType,
    VmState, VsockOverride, REQUEST_TIMEOUT,
};
use crate::snapshot::{after_save, conclude, require_fresh};
use crate::{
    check_inputs, process, BackendKind, Manifest, Shape, SnapshotInfo, SnapshotPaths, VmConfig,
    VmHandle, VmmError, WhilePaused,
};

/// The interface id banger gives the VM's one network interface.
pub(crate) const IFACE_ID: &str = "eth0";
/// What a Firecracker snapshot loads into beyond vCPUs, memory and the network interface.
const LAYOUT: &str = "firecracker vsock";
/// Bound on writing or loading the state and memory files.
const STATE_TIMEOUT: Duration = Duration::from_secs(600);

impl FirecrackerBackend {
    pub(super) async fn snapshot_vm(
        &self,
        handle: &VmHandle,
        dest: &SnapshotPaths,
        while_paused: WhilePaused<'_>,
    ) -> Result<SnapshotInfo, VmmError> {
        let vm = handle.name.as_str();
        let api = |step: &'static str| {
            move |source| VmmError::Api {
                vm: vm.to_string(),
                step,
                source,
            }
        };
        let socket = handle.control_socket()?;
        require_fresh(dest, vm)?;
        let client = FirecrackerClient::new(socket).with_timeout(REQUEST_TIMEOUT);
        let config = client
            .vm_config()
            .await
            .map_err(api("reading the VM's configuration"))?;
        let machine = config
            .machine_config
            .ok_or_else(|| VmmError::InvalidConfig {
                vm: vm.to_string(),
                reason: "Firecracker reports no machine configuration".into(),
            })?;
        let shape = Shape {
            backend: BackendKind::Firecracker,
            vcpus: machine.vcpu_count,
            memory_mib: machine.mem_size_mib,
            network: !config.network_interfaces.is_empty(),
            layout: LAYOUT.to_string(),
        };

        let paused_at = Instant::now();
        client
            .patch_vm(VmState::Paused)
            .await
            .map_err(api("pausing the guest"))?;
        let saved = async {
            client
                .clone()
                .with_timeout(STATE_TIMEOUT)
                .create_snapshot(&SnapshotCreateParams {
                    mem_file_path: dest.memory(),
                    snapshot_path: dest.state(),
                    snapshot_type: Some(SnapshotType::Full),
                })
                .await
                .map_err(api("saving the state"))?;
            restrict(vm, &[dest.state(), dest.memory()])?;
            after_save(
                vm,
                dest,
                &[dest.state(), dest.memory()],
                shape,
                paused_at,
                while_paused,
            )
            .await
        }
        .await;
        let resumed = client
            .patch_vm(VmState::Resumed)
            .await
            .map_err(api("resuming the guest"));
        conclude(vm, dest, saved, resumed, paused_at)
    }

    pub(super) async fn restore_vm(
        &self,
        cfg: &VmConfig,
        snapshot: &SnapshotPaths,
    ) -> Result<VmHandle, VmmError> {
        check_inputs(cfg)?;
        let manifest = Manifest::read(snapshot, &cfg.name)?;
        let shape = Shape {
            backend: BackendKind::Firecracker,
            vcpus: cfg.vcpus,
            memory_mib: cfg.memory_mib,
            network: cfg.net.is_some(),
            layout: LAYOUT.to_string(),
        };
        manifest
            .shape
            .require_equal(&shape, &cfg.name, &snapshot.manifest())?;
        for (what, path) in [
            ("state file", snapshot.state()),
            ("memory file", snapshot.memory()),
        ] {
            if !path.is_file() {
                return Err(VmmError::MissingInput {
                    vm: cfg.name.clone(),
                    what,
                    path,
                });
            }
        }

        let (spawned, client, files) = self.launch(cfg).await?;
        let loaded = async {
            configure_logger(&client, cfg, &files).await?;
            client
                .clone()
                .with_timeout(STATE_TIMEOUT)
                .load_snapshot(&load_params(cfg, snapshot, files.vsock_uds.clone()))
                .await
                .map_err(|source| VmmError::Api {
                    vm: cfg.name.clone(),
                    step: "loading the snapshot",
                    source,
                })
        }
        .await;
        if let Err(e) = loaded {
            // Never leave a Firecracker behind that waits for a snapshot it will not get.
            let _ = process::terminate(spawned.pid, spawned.start_time, Duration::ZERO).await;
            return Err(e);
        }
        Ok(handle(&cfg.name, &cfg.run_dir, spawned))
    }
}

/// The `PUT /snapshot/load` body for a restore of `cfg`.
pub(crate) fn load_params(
    cfg: &VmConfig,
    snapshot: &SnapshotPaths,
    vsock_uds: PathBuf,
) -> SnapshotLoadParams {
    SnapshotLoadParams {
        snapshot_path: snapshot.state(),
        mem_backend: Some(MemoryBackend {
            backend_type: MemoryBackendType::File,
            backend_path: snapshot.memory(),
        }),
        resume_vm: Some(true),
        // The saved device keeps its old MAC (the guest's view is part of the state); only the
        // host side moves to the new VM's tap. The guest agent sets the new MAC later.
        network_overrides: cfg
            .net
            .iter()
            .map(|net| NetworkOverride {
                iface_id: IFACE_ID.to_string(),
                host_dev_name: net.tap.as_str().to_owned(),
            })
            .collect(),
        vsock_override: Some(VsockOverride {
            uds_path: vsock_uds,
        }),
        track_dirty_pages: None,
        // Otherwise the guest's kvmclock resumes from the moment of the snapshot.
        clock_realtime: Some(true),
    }
}

/// Makes the files Firecracker wrote readable by their owner only: they hold guest memory.
fn restrict(vm: &str, files: &[PathBuf]) -> Result<(), VmmError> {
    use std::os::unix::fs::PermissionsExt;
    for f in files {
        fs_err::set_permissions(f, std::fs::Permissions::from_mode(0o600)).map_err(|source| {
            VmmError::Io {
                vm: vm.to_string(),
                action: format!("cannot restrict access to {}", f.display()),
                source,
            }
        })?;
    }
    Ok(())
}
