//! Starting a VM: the host network and the VM's tap, the kernel command line and (for VMs that
//! boot with the agent as PID 1) the initramfs, the VMM, then waiting until the guest agent (and
//! sshd, where the guest has one) answers. Restart is a stop followed by this.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use banger_agent::cmdline::{BootSettings, Ipv4Cidr};
use banger_api::vm::{VmInfo, VmState};
use banger_api::{ApiError, Boot, ErrorCode};
use banger_image::Progress;
use banger_net::Subnet;
use banger_vmm::VmConfig;
use futures_util::future::BoxFuture;

use crate::console_log::ConsoleLog;
use crate::hints;
use crate::server::{internal, Emitter};
use crate::store::{self, VmRow};

use super::{api, Vms, HOST_KEY, IMAGE_RUNTIME_FILE};
use crate::server::disk_error;

/// Whether a booted guest's sshd answers on `addr`, port 22: one quick attempt (the caller
/// retries until its deadline). The seam lets tests without a guest say yes or no.
pub trait SshdProbe: Send + Sync {
    fn answers(&self, addr: Ipv4Addr) -> BoxFuture<'_, bool>;
}

/// The real probe: a TCP connection, given two seconds.
pub struct TcpSshd;

impl SshdProbe for TcpSshd {
    fn answers(&self, addr: Ipv4Addr) -> BoxFuture<'_, bool> {
        Box::pin(async move {
            let connect = tokio::net::TcpStream::connect((addr, 22));
            matches!(
                tokio::time::timeout(Duration::from_secs(2), connect).await,
                Ok(Ok(_))
            )
        })
    }
}

/// A row whose text does not parse back (it was written by banger, so this is a bug or an edit).
fn broken_record(row: &VmRow, what: &dyn std::fmt::Display) -> ApiError {
    api(
        ErrorCode::Internal,
        format!("VM {} has a broken record: {what}", row.name),
    )
}

/// The VM's address and network interface as its row records them (checked again: the row is
/// only text).
fn addresses(row: &VmRow) -> Result<(Ipv4Addr, banger_vmm::Nic), ApiError> {
    let bad = |e: &dyn std::fmt::Display| broken_record(row, e);
    let ip = row.ip.parse().map_err(|e| bad(&e))?;
    let nic = banger_vmm::Nic {
        tap: banger_net::TapName::parse(&row.tap).map_err(|e| bad(&e))?,
        mac: row.mac.parse().map_err(|e| bad(&e))?,
    };
    Ok((ip, nic))
}

/// This boot's settings for the guest agent: the VM's address on the bridge, the bridge as its
/// gateway and name server, its name as host name, and the host's clock.
fn boot_settings(row: &VmRow, ip: Ipv4Addr, subnet: &Subnet) -> Result<BootSettings, ApiError> {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Ok(BootSettings {
        ip: Ipv4Cidr::new(ip, subnet.prefix_len()),
        gateway: Some(subnet.gateway()),
        // VM names are DNS labels (banger_api::validate_name), so this always parses.
        hostname: Some(
            row.name
                .parse()
                .map_err(|e: String| broken_record(row, &e))?,
        ),
        dns: vec![subnet.gateway()],
        time: Some(now),
    })
}

/// The kernel command line of a VM: the console, the root disk, systemd's own words for guests
/// that boot with it, then the per-boot settings the agent reads.
fn kernel_command_line(boot: Boot, settings: &BootSettings) -> String {
    let systemd = match boot {
        Boot::Systemd => " net.ifnames=0 systemd.show_status=0",
        Boot::Agent => "",
    };
    format!("console=ttyS0 reboot=k panic=1 root=/dev/vda rw rootfstype=ext4{systemd} {settings}")
}

/// banger's kernel command line for an image that boots this way, without the settings of any
/// one VM: what a warm snapshot's guest was booted with, as far as banger decides it.
pub(super) fn boot_template(boot: Boot) -> String {
    kernel_command_line(boot, &BootSettings::default())
}

/// A start from a snapshot rather than a boot.
pub(super) struct Restore {
    pub paths: banger_vmm::SnapshotPaths,
    /// A warm snapshot: its guest has no work disk mounted, and mounts this VM's once it has
    /// its new identity. Its agent is given less time to answer than a booting one (a
    /// restored guest runs at once), so a damaged snapshot is found out soon.
    pub warm: bool,
}

/// Why a start failed, and whether the snapshot it restored is to blame (its VMM would not
/// load it, or the guest it held never answered or could not take on its identity), as
/// opposed to the host (the network, the DNS port, a missing kernel).
#[derive(Debug)]
pub(super) struct StartError {
    pub error: ApiError,
    pub snapshot_at_fault: bool,
}

impl From<ApiError> for StartError {
    fn from(error: ApiError) -> Self {
        StartError {
            error,
            snapshot_at_fault: false,
        }
    }
}

impl From<StartError> for ApiError {
    fn from(e: StartError) -> Self {
        e.error
    }
}

/// How long a guest restored from a warm snapshot has to answer.
const WARM_AGENT_TIMEOUT: Duration = Duration::from_secs(60);

impl Vms {
    pub async fn start(
        self: &Arc<Self>,
        name: &str,
        progress: Emitter,
    ) -> Result<VmInfo, ApiError> {
        let lock = self.lock_for(name);
        let _guard = lock.lock().await;
        self.start_locked(name, &progress, None).await?;
        self.show(name).await
    }

    /// Boots a stopped VM (or, with `restore`, starts it from that snapshot, then has the guest
    /// take on the VM's own identity) and waits until its agent and sshd answer. Caller holds
    /// the VM lock.
    pub(super) async fn start_locked(
        self: &Arc<Self>,
        name: &str,
        progress: &Emitter,
        restore: Option<&Restore>,
    ) -> Result<(), StartError> {
        self.start_until_agent(name, progress, restore).await?;
        Ok(self.wait_for_sshd(name, progress).await?)
    }

    /// [`Vms::start_locked`] up to the agent answering (and, after a restore, the guest having
    /// taken on its identity), without waiting for sshd.
    pub(super) async fn start_until_agent(
        self: &Arc<Self>,
        name: &str,
        progress: &Emitter,
        restore: Option<&Restore>,
    ) -> Result<(), StartError> {
        let mut snapshot_at_fault = false;
        self.start_until_agent_inner(name, progress, restore, &mut snapshot_at_fault)
            .await
            .map_err(|error| StartError {
                error,
                snapshot_at_fault,
            })
    }

    /// [`Vms::start_until_agent`]; sets `snapshot_at_fault` when it fails because of the
    /// snapshot it restores.
    async fn start_until_agent_inner(
        self: &Arc<Self>,
        name: &str,
        progress: &Emitter,
        restore: Option<&Restore>,
        snapshot_at_fault: &mut bool,
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
            hints::failed(ErrorCode::VmmFailed, format!("no VMM can run VM {name}"), e)
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

        let (ip, nic) = addresses(&row)?;
        let settings = boot_settings(&row, ip, &self.net.config().subnet)?;

        progress.phase("network");
        let uid = nix::unistd::geteuid();
        // The per-VM lock makes this start the only one of this VM.
        let _starting = self.starting.claim(name, ());
        let attached = {
            let _g = self.net_lock.lock().await;
            let net = self.net.clone();
            let id = row.id.clone();
            let guard = self
                .port_guard(&row)
                .ok_or_else(|| broken_record(&row, &"its address or MAC does not parse"))?;
            let attached = tokio::task::spawn_blocking(move || net.attach_vm(&id, uid, guard))
                .await
                .map_err(|e| internal(e.into()))?;
            match attached {
                Ok(_) => self.dns.ensure_running().await.map_err(Err),
                Err(e) => Err(Ok(e)),
            }
        };
        match attached {
            Ok(()) => {}
            Err(Ok(e)) => {
                // Whatever part of the network was made (the bridge, say) goes again when no
                // other VM needs it.
                self.release_network(&row).await;
                return Err(hints::failed(ErrorCode::VmmFailed, format!("cannot set up the network for VM {name}"), &e)
                    .with_hint("banger needs root or passwordless sudo for the bridge, tap and nft rules; see `banger doctor`"));
            }
            Err(Err(e)) => {
                // Port 53 on the bridge is redirected to the server's port: with anyone else
                // on that port, guests' queries would reach them. Nothing runs until it is ours.
                self.release_network(&row).await;
                let port = banger_net::nat::DNS_SERVE_PORT;
                let taken = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::AddrInUse)
                });
                let what = format!("cannot serve DNS for VM {name}");
                return Err(if taken {
                    hints::failed(ErrorCode::InUse, what, e.as_ref())
                        .with_hint(format!("another program holds port {port} on the bridge address; stop it (`ss -lunpt 'sport = :{port}'` names it), or set `bridge_subnet` to another range"))
                } else {
                    hints::failed(ErrorCode::VmmFailed, what, e.as_ref())
                });
            }
        }

        progress.phase("boot");
        let dir = self.vm_dir(name);
        let run_dir = self.run_dir(&row.id);
        let console = self.console_log(name);
        let prep = (|| -> anyhow::Result<()> {
            let _ = std::fs::remove_dir_all(&run_dir);
            std::fs::create_dir_all(&run_dir)
                .with_context(|| format!("cannot create {}", run_dir.display()))?;
            // Each boot starts a fresh console log (and drops the older half of the last one)
            // so what `vm logs` and the tails in errors show is about this boot.
            ConsoleLog::new(console.clone()).start_fresh()
        })();
        if let Err(e) = prep {
            self.release_network(&row).await;
            return Err(api(
                ErrorCode::Internal,
                format!("cannot prepare VM {name} to boot: {e:#}"),
            ));
        }
        let kernel_args = kernel_command_line(row.boot, &settings);
        let initrd = match row.boot {
            Boot::Systemd => kernel.initrd.as_ref().map(PathBuf::from),
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
                Some(initrd)
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
        let started = match restore {
            None => backend.start(&cfg).await,
            Some(snapshot) => {
                progress.phase("restore");
                backend.restore(&cfg, &snapshot.paths).await
            }
        };
        let handle = match started {
            Ok(h) => h,
            Err(e) => {
                self.release_network(&row).await;
                // The whole chain (a VmmError's message leaves its cause to `source()`) and
                // every hint, for the caller and for `last_error` alike.
                let report = hints::report(&e)
                    .context(format!("VM {name} failed to start"))
                    .with_hint(format!("console log: {}", console.display()));
                self.set_state(
                    name,
                    VmState::Failed,
                    Some(backend.kind().as_str()),
                    None,
                    Some(&report.to_string()),
                )
                .await?;
                *snapshot_at_fault = restore.is_some();
                return Err(hints::api_error(ErrorCode::VmmFailed, report));
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
        let wait = match restore {
            Some(r) if r.warm => self.timeouts.boot.min(WARM_AGENT_TIMEOUT),
            _ => self.timeouts.boot,
        };
        let ready = self.wait_for_agent(name, &handle, wait).await;
        let ready = match (ready, restore) {
            (Ok((client, _)), Some(restore)) => {
                // Until this answers, the guest is a copy of the snapshot's: its packets, from
                // the old address and MAC, go nowhere (the tap's guard knows only the new).
                progress.phase("new identity");
                let identity = self.identity(&row, settings.clone())?;
                let ready = client.reidentify(identity, wait).await;
                let ready = match ready {
                    // The work disk under /dev/vdb is this VM's own, made as for a boot.
                    Ok(_) if restore.warm => client.work_disk(true, wait).await,
                    other => other,
                };
                ready.map(|ready| (client, ready))
            }
            (ready, _) => ready,
        };
        let client = match ready {
            Ok((client, _ready)) => client,
            Err(e) => {
                let console_tail = console.clone();
                let tail = tokio::task::spawn_blocking(move || {
                    banger_config::logtail::tail(&console_tail, 15)
                })
                .await
                .unwrap_or_default();
                let report = hints::report(&e)
                    .context(format!("VM {name} did not become ready"))
                    .with_hint(format!(
                        "the VM is kept for inspection: full log {} (`banger vm logs {name}`); delete it with `banger vm delete --force {name}`",
                        console.display()
                    ));
                let mut err = hints::api_error(ErrorCode::BootTimeout, report);
                err.message
                    .push_str(&format!("\nlast lines of its console:\n{tail}"));
                *snapshot_at_fault = restore.is_some();
                return Err(err);
            }
        };
        self.agents
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(name.to_owned(), client);
        Ok(())
    }

    /// Waits until the sshd of running VM `name` answers, for a guest that has one.
    pub(super) async fn wait_for_sshd(
        &self,
        name: &str,
        progress: &Emitter,
    ) -> Result<(), ApiError> {
        let row = self.row(name).await?;
        if row.boot != Boot::Systemd {
            // No sshd in this guest: the agent being up is what "up" means.
            return Ok(());
        }
        let (ip, _) = addresses(&row)?;
        progress.phase("wait for ssh");
        let addr = format!("{}:22", row.ip);
        let deadline = tokio::time::Instant::now() + self.timeouts.sshd;
        while !self.sshd.answers(ip).await {
            if tokio::time::Instant::now() > deadline {
                return Err(api(
                    ErrorCode::BootTimeout,
                    format!("VM {name} is up but sshd does not answer on {addr}"),
                )
                .with_hint(format!(
                    "the VM is kept; try `banger vm exec {name} -- systemctl status ssh`, or see `banger vm logs {name}`"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(())
    }

    /// The identity VM `row` has now (its address, name, MAC, its own host key), with a new
    /// machine-id and seed: given to the VM a warm snapshot was taken of, which booted with a
    /// throwaway host key so that its own never reaches the snapshot.
    pub(super) fn own_identity(
        &self,
        row: &VmRow,
    ) -> Result<banger_agent::host::Identity, ApiError> {
        let (ip, _) = addresses(row)?;
        let settings = boot_settings(row, ip, &self.net.config().subnet)?;
        self.identity(row, settings)
    }

    /// Who a guest restored from a snapshot becomes: this VM's address, name and clock
    /// (`settings`), its MAC, a new machine-id and random seed, and for a guest with sshd the
    /// host key made for this VM (pinned in known_hosts).
    fn identity(
        &self,
        row: &VmRow,
        settings: BootSettings,
    ) -> Result<banger_agent::host::Identity, ApiError> {
        let machine_id = hex::encode(rand::random::<[u8; 16]>());
        let seed = rand::random::<[u8; 64]>().to_vec();
        let ssh_host_key = match row.boot {
            Boot::Agent => None,
            Boot::Systemd => {
                let dir = self.vm_dir(&row.name);
                let read = |file: &str| {
                    std::fs::read_to_string(dir.join(file)).map_err(|e| {
                        api(
                            ErrorCode::Internal,
                            format!("cannot read VM {}'s host key {file}: {e}", row.name),
                        )
                    })
                };
                Some(banger_agent::protocol::SshHostKey {
                    private: read(HOST_KEY)?,
                    public: read(&format!("{HOST_KEY}.pub"))?.trim_end().to_owned(),
                })
            }
        };
        Ok(banger_agent::host::Identity {
            boot: settings,
            mac: row.mac.clone(),
            machine_id,
            seed,
            ssh_host_key,
        })
    }

    /// Writes the initramfs an agent-booted VM starts with: the kernel's modules archive, then an
    /// archive with the agent binary as `/init` and the image's runtime settings.
    async fn agent_initrd(
        &self,
        kernel: &banger_api::KernelInfo,
        runtime: &Path,
        out: &Path,
    ) -> Result<(), ApiError> {
        let agent = self.agent_binary.find()?;
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
        .map_err(|e| disk_error(e, "cannot assemble the VM's initramfs"))
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
        self.start_locked(name, &progress, None).await?;
        self.show(name).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_agent::cmdline;

    fn row(boot: Boot) -> VmRow {
        VmRow {
            name: "dev-box".into(),
            id: "0a1b2c3d".into(),
            image: "img".into(),
            kernel: "k".into(),
            state: banger_api::vm::VmState::Stopped,
            spec: banger_api::vm::VmSpec {
                vcpu: 1,
                memory_mib: 256,
                disk_bytes: 1 << 30,
            },
            ip: "172.16.0.2".into(),
            mac: "02:ba:ac:10:00:02".into(),
            tap: "bg-0a1b2c3d".into(),
            vmm: None,
            handle: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            last_error: None,
            boot,
            host_access: false,
            allow_hosts: Vec::new(),
            no_network: false,
        }
    }

    #[test]
    fn the_agent_reads_back_every_setting_the_daemon_puts_on_the_command_line() {
        let subnet: Subnet = "172.16.0.1/24".parse().unwrap();
        for boot in [Boot::Systemd, Boot::Agent] {
            let settings =
                boot_settings(&row(boot), "172.16.0.2".parse().unwrap(), &subnet).unwrap();
            let line = kernel_command_line(boot, &settings);
            let parsed = cmdline::parse(&line);
            assert_eq!(parsed.warnings, Vec::<String>::new(), "{line}");
            assert_eq!(parsed.settings, settings);
            assert_eq!(
                settings.ip.map(|c| c.to_string()).as_deref(),
                Some("172.16.0.2/24")
            );
            assert_eq!(settings.dns, vec![subnet.gateway()]);
            // The agent as /init mounts the root disk from the same line.
            let (root, warnings) = cmdline::parse_root(&line);
            assert!(warnings.is_empty(), "{warnings:?}");
            assert_eq!(root.device.as_deref(), Some(Path::new("/dev/vda")));
            assert!(!root.read_only);
            assert_eq!(
                line.contains("systemd.show_status=0"),
                boot == Boot::Systemd,
                "{line}"
            );
        }
    }
}
