//! Creating a VM: name and lease reserved in one transaction (the row in state `creating` is
//! the lease), the root disk cloned from the image with banger's files written into it, the
//! work disk made, then the row marked `stopped` (and the VM started unless asked not to). Any
//! failure before that removes everything the attempt made.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use banger_api::vm::{CreateVmRequest, VmInfo, VmState};
use banger_api::{validate_name, ApiError, Boot, ErrorCode};
use banger_image::Progress;

use crate::server::{internal, Emitter};
use crate::store::{self, VmRow};
use crate::{fsutil, names, now_rfc3339, sshkeys, vmdisk};

use super::start::{Restore, StartError};
use super::warm::WarmPlan;
use super::{api, Vms, HOST_KEY, IMAGE_RUNTIME_FILE};
use crate::server::disk_error;

/// The VM's own egress flags, checked: names that parse, and no flags that contradict.
fn egress_flags(req: &CreateVmRequest) -> Result<Vec<banger_net::HostPattern>, ApiError> {
    if req.no_network && !req.allow_hosts.is_empty() {
        return Err(api(
            ErrorCode::BadRequest,
            "--no-network and --allow-host contradict each other".to_owned(),
        )
        .with_hint("give one of them"));
    }
    if req.no_network && req.host_access {
        return Err(api(
            ErrorCode::BadRequest,
            "--no-network and --host-access contradict each other".to_owned(),
        )
        .with_hint("give one of them"));
    }
    banger_net::egress::parse_hosts(&req.allow_hosts)
        .map_err(|e| crate::hints::api_error(ErrorCode::BadRequest, crate::hints::report(&e)))
}

impl Vms {
    /// Creates a VM (and starts it unless asked not to).
    pub async fn create(
        self: &Arc<Self>,
        req: CreateVmRequest,
        progress: Emitter,
    ) -> Result<VmInfo, ApiError> {
        progress.phase("allocate");
        // From a snapshot: its image and shape, whatever the request says.
        let mut req = req;
        let from = match &req.from {
            None => None,
            Some(snap) => {
                let snap = self.snapshot_row(snap).await?;
                let images = crate::images::image_with_kernel(&self.store, &snap.image).await;
                if let Err(e) = images {
                    return Err(api(
                        ErrorCode::NotFound,
                        format!(
                            "snapshot {} was taken of image {}, which is no longer here: {}",
                            snap.name, snap.image, e.message
                        ),
                    )
                    .with_hint("delete the snapshot (`banger snapshot delete`), or pull or build the image again under its name"));
                }
                if snap.warm_key.is_some() && !req.start {
                    return Err(api(
                        ErrorCode::BadRequest,
                        format!(
                            "{} is a warm snapshot: it holds a VM only as it is running, so a VM made from it must start",
                            snap.name
                        ),
                    )
                    .with_hint("drop --no-start, or create the VM from its image"));
                }
                req.image = snap.image.clone();
                req.spec = snap.spec;
                Some(snap)
            }
        };
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
        let agent_bin = self.agent_binary.find()?;

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
        let host_access = req.host_access;
        let no_network = req.no_network;
        let allow_hosts = egress_flags(&req)?;
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
                    Err(e) => {
                        let report = crate::hints::report(&e);
                        return Ok(Err(crate::hints::api_error(
                            ErrorCode::NoFreeAddress,
                            report,
                        )));
                    }
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
                    host_access,
                    allow_hosts,
                    no_network,
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

        // Warm starts: only for a VM made from an image and started now, or from a warm
        // snapshot named with `--from`.
        let (from, named_warm) = match from {
            Some(s) if s.warm_key.is_some() => (None, Some(s)),
            other => (other, None),
        };
        let mut warm = match (named_warm, &from, req.cold, req.start) {
            (Some(named), ..) => WarmPlan::Restore(named, None),
            (None, None, false, true) if self.config.warm_starts() => {
                self.warm_plan(&image, &kernel, spec, &agent_bin, &progress)
                    .await
            }
            _ => WarmPlan::Off,
        };
        // The snapshot restored is leased until its VMM has loaded it: deleting it (`snapshot
        // delete`, or another create that found it out of date or broken) waits until then.
        let mut lease = match (&from, &warm) {
            (Some(s), _) | (None, WarmPlan::Restore(s, _)) => {
                Some(self.snapshot_leases.read(&s.name).await)
            }
            _ => None,
        };
        let rootfs = Path::new(&image.rootfs).to_owned();
        let from_image = |warm: &WarmPlan| RootFrom::Image {
            rootfs: rootfs.clone(),
            throwaway_key: matches!(warm, WarmPlan::Keep(..)),
        };
        let mut prepared = match (&from, &warm) {
            (Some(snap), _) => self.disks_from_snapshot(&row, snap, &progress).await,
            (None, WarmPlan::Restore(snap, _)) => {
                let root = RootFrom::Warm(self.snapshot_dir(&snap.name).join("root.ext4"));
                self.prepare_disks(&row, root, &agent_bin, &req, &progress)
                    .await
            }
            (None, _) => {
                self.prepare_disks(&row, from_image(&warm), &agent_bin, &req, &progress)
                    .await
            }
        };
        if let (Err(e), WarmPlan::Restore(snap, key)) = (&prepared, &warm) {
            // Its files are missing or unreadable: this VM is made from the image instead.
            drop(lease.take());
            warm = self
                .give_up_warm(snap, key.clone(), &name, &e.message, &progress)
                .await;
            let _ = std::fs::remove_dir_all(self.vm_dir(&name));
            prepared = self
                .prepare_disks(&row, from_image(&warm), &agent_bin, &req, &progress)
                .await;
        }
        drop(image_held);
        if let Err(e) = prepared {
            self.remove_everything(&row).await;
            return Err(e);
        }
        self.set_state(&name, VmState::Stopped, None, None, None)
            .await?;
        self.refresh_names().await;
        if !req.start {
            return self.show(&name).await;
        }
        let restore = match (&from, &warm) {
            (Some(s), _) => Some((s.name.clone(), false)),
            (None, WarmPlan::Restore(s, _)) => Some((s.name.clone(), true)),
            (None, _) => None,
        }
        .map(|(snapshot, warm)| {
            let paths = banger_vmm::SnapshotPaths::new(self.snapshot_dir(&snapshot));
            (snapshot, Restore { paths, warm })
        });
        let mut started_from = restore.as_ref().map(|(s, _)| s.clone());
        let mut started = self
            .start_until_agent(&name, &progress, restore.as_ref().map(|(_, r)| r))
            .await;
        if let (Err(e), WarmPlan::Restore(snap, key)) = (&started, &warm) {
            if e.snapshot_at_fault {
                // A damaged file, or a guest that never answered: only a slower start.
                drop(lease.take());
                warm = self
                    .give_up_warm(snap, key.clone(), &name, &e.error.message, &progress)
                    .await;
                started_from = None;
                let throwaway_key = matches!(warm, WarmPlan::Keep(..));
                started = self
                    .boot_after_failed_restore(&name, throwaway_key, &progress)
                    .await;
            }
        }
        drop(lease);
        if let Err(e) = started {
            // A guest that booted but never became ready is kept for inspection; any other
            // failure to start leaves no half-made VM behind.
            if e.error.code != ErrorCode::BootTimeout {
                if let Ok(row) = self.row(&name).await {
                    self.remove_everything(&row).await;
                }
            }
            return Err(e.error);
        }
        if let WarmPlan::Keep(key, _claim) = &warm {
            if let Err(e) = self.keep_warm(&name, key, &progress).await {
                if let Ok(row) = self.row(&name).await {
                    self.remove_everything(&row).await;
                }
                return Err(e);
            }
        }
        // A guest whose sshd does not answer is kept, as one whose agent did not.
        self.wait_for_sshd(&name, &progress).await?;
        let mut info = self.show(&name).await?;
        info.started_from = started_from;
        Ok(info)
    }

    /// After a warm snapshot failed to restore for VM `name`: whatever of it runs is stopped,
    /// its root disk is made again from its image (with a throwaway host key when a new warm
    /// snapshot is to be kept), and it boots. Caller holds the VM lock.
    async fn boot_after_failed_restore(
        self: &Arc<Self>,
        name: &str,
        throwaway_key: bool,
        progress: &Emitter,
    ) -> Result<(), StartError> {
        self.stop_locked(name, true).await?;
        self.forget_agent(name);
        let row = self.row(name).await?;
        let held = self.image_locks.read(&row.image).await;
        let (image, _) = crate::images::image_with_kernel(&self.store, &row.image).await?;
        let agent_bin = self.agent_binary.find()?;
        let _ = std::fs::remove_file(self.vm_dir(name).join("root.ext4"));
        let root = RootFrom::Image {
            rootfs: PathBuf::from(&image.rootfs),
            throwaway_key,
        };
        self.root_disk(&row, root, &agent_bin, progress).await?;
        drop(held);
        self.set_state(name, VmState::Stopped, None, None, None)
            .await?;
        self.start_until_agent(name, progress, None).await
    }

    /// A VM's disks from a snapshot: its root and work disks cloned (reflinks where the file
    /// system can), a host key of its own for a guest with sshd (handed to the guest when it
    /// takes on its identity), the image's settings for one without.
    async fn disks_from_snapshot(
        &self,
        row: &VmRow,
        snap: &store::SnapshotRow,
        progress: &Emitter,
    ) -> Result<(), ApiError> {
        let dir = self.vm_dir(&row.name);
        self.vm_files(row).await?;
        progress.phase("clone snapshot disks");
        let from = self.snapshot_dir(&snap.name);
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for disk in super::snapshot::DISKS {
                fsutil::clone_file(&from.join(disk), &dir.join(disk))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot clone the snapshot's disks"))
    }

    /// A VM's disks for a boot (or a warm start): its root disk cloned from `root` with banger's
    /// files in it, a host key where the guest runs sshd, and its work disk.
    async fn prepare_disks(
        &self,
        row: &VmRow,
        root: RootFrom,
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
        self.vm_files(row).await?;
        self.root_disk(row, root, agent_bin, progress).await?;

        progress.phase("prepare work disk");
        let dir2 = dir.clone();
        let sync = req.file_sync.clone();
        let size = req.spec.disk_bytes;
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let scratch = tempfile::tempdir_in(&dir2)?;
            let staging = scratch.path().join("work");
            std::fs::create_dir(&staging)?;
            vmdisk::make_work_disk(&dir2.join("work.ext4"), size, &authorized, &sync, &staging)?;
            Ok(())
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, "cannot prepare the VM's disks"))?;
        Ok(())
    }

    /// The VM's directory with what each VM has of its own besides disks: a host key for a
    /// guest with sshd (pinned in known_hosts), the image's runtime settings for one whose
    /// agent runs as PID 1 (handed to it in the initramfs at every start).
    async fn vm_files(&self, row: &VmRow) -> Result<(), ApiError> {
        let dir = self.vm_dir(&row.name);
        std::fs::create_dir_all(&dir).map_err(|e| {
            api(
                ErrorCode::Internal,
                format!("cannot create {}: {e}", dir.display()),
            )
        })?;
        match row.boot {
            Boot::Systemd => {
                sshkeys::keygen(&dir.join(HOST_KEY), &format!("banger-{}", row.name)).await
            }
            Boot::Agent => {
                let image = row.image.clone();
                let json = self
                    .store
                    .call(move |c| store::image_runtime(c, &image))
                    .await
                    .map_err(internal)?
                    .unwrap_or_else(|| "{}".to_owned());
                let path = dir.join(IMAGE_RUNTIME_FILE);
                std::fs::write(&path, json).map_err(|e| {
                    api(
                        ErrorCode::Internal,
                        format!("cannot write {}: {e}", path.display()),
                    )
                })
            }
        }
    }

    /// The VM's root disk (`root.ext4` in its directory, whose host key is made already):
    /// cloned from `root`; from an image, with banger's files written into it for a guest that
    /// boots with systemd.
    async fn root_disk(
        &self,
        row: &VmRow,
        root: RootFrom,
        agent_bin: &Path,
        progress: &Emitter,
    ) -> Result<(), ApiError> {
        progress.phase("clone root disk");
        let dir = self.vm_dir(&row.name);
        let what = match root {
            RootFrom::Warm(_) => "cannot clone the warm snapshot's root disk into the VM's",
            RootFrom::Image { .. } => "cannot clone the image into the VM's root disk",
        };
        let (src, key) = match root {
            // A warm snapshot's root disk has banger's files in it already.
            RootFrom::Warm(path) => (path, None),
            RootFrom::Image { rootfs, .. } if row.boot != Boot::Systemd => (rootfs, None),
            RootFrom::Image {
                rootfs,
                throwaway_key: false,
            } => (rootfs, Some(HOST_KEY.to_owned())),
            RootFrom::Image {
                rootfs,
                throwaway_key: true,
            } => {
                // The VM's own key must not reach the warm snapshot (every VM made from it
                // could read it off its disk): it boots with this one, and is given its own
                // right after the snapshot.
                sshkeys::keygen(&dir.join(THROWAWAY_KEY), "banger-warm-snapshot").await?;
                (rootfs, Some(THROWAWAY_KEY.to_owned()))
            }
        };
        let agent = agent_bin.to_owned();
        let kind = tokio::task::spawn_blocking(move || -> anyhow::Result<fsutil::CloneKind> {
            let kind = fsutil::clone_file(&src, &dir.join("root.ext4"))?;
            if let Some(key) = key {
                inject(&dir, &agent, &key)?;
                if key == THROWAWAY_KEY {
                    std::fs::remove_file(dir.join(THROWAWAY_KEY))?;
                    std::fs::remove_file(dir.join(format!("{THROWAWAY_KEY}.pub")))?;
                }
            }
            Ok(kind)
        })
        .await
        .map_err(|e| internal(e.into()))?
        .map_err(|e| disk_error(e, what))?;
        progress.log(&format!("root disk: {kind:?}"));
        Ok(())
    }
}

/// A host key for a VM that a warm snapshot is taken of, made and removed in its directory.
const THROWAWAY_KEY: &str = "warm_host_key";

/// Where a new VM's root disk is cloned from.
enum RootFrom {
    /// The image's root file system; banger's files are written into the clone, with a
    /// throwaway host key when a warm snapshot will be taken of the VM.
    Image {
        rootfs: PathBuf,
        throwaway_key: bool,
    },
    /// A warm snapshot's root disk, which has them already.
    Warm(PathBuf),
}

/// Writes banger's files into the root disk in `dir` of a guest that boots with systemd: the
/// agent, its unit, and the host key `key` (a file in `dir`, with its `.pub`).
fn inject(dir: &Path, agent: &Path, key: &str) -> anyhow::Result<()> {
    let scratch = tempfile::tempdir_in(dir)?;
    vmdisk::inject(
        &dir.join("root.ext4"),
        &vmdisk::Injection {
            agent_binary: agent,
            unit_text: banger_agent::SYSTEMD_UNIT,
            host_key: &dir.join(key),
            host_key_pub: &dir.join(format!("{key}.pub")),
        },
        scratch.path(),
    )
}
