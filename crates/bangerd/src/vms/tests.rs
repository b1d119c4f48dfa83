//! The VM lifecycle without root and without a guest: banger-vmm's `FakeVmm` stands in for the
//! VMM (serving the real agent loop over a socket pair, as banger-agent's own end-to-end tests
//! do), banger-net's `FakeHostNet` for the host network, and recording fakes for the `.vm` name
//! service and the sshd probe. Disks are made for real: cloning, `mkfs.ext4` and `debugfs` need
//! no root and take milliseconds, and a fake would hide the failures worth rolling back from.
//! Everything lives in a temporary directory that stands for HOME.
//!
//! A daemon "crash" runs a daemon on a runtime of its own and drops that runtime: its tasks die
//! with it, while the store, the fake host network and the fake VMM processes live on, as the
//! real ones do.

use std::future::Future;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use banger_agent::guest::power::PowerControl;
use banger_agent::guest::serve::{serve_session, FrameWriter, ServeConfig, BASE_ENV};
use banger_api::vm::{CreateVmRequest, ExecEvent, ExecRequest, VmInfo, VmSpec, VmState};
use banger_api::{ApiError, Boot, DnsStatus, ErrorCode, ImageInfo, KernelInfo, Source};
use banger_config::{Config, Paths};
use banger_net::fake::FakeHostNet;
use banger_net::{BridgeConfig, BridgeName, HostNet, Network, TapName};
use banger_vmm::testkit::{FakeCall, FakeVmm};
use banger_vmm::{Backends, VmConfig, Vmm};
use futures_util::future::BoxFuture;

use super::{AgentBinary, Effects, SshdProbe, Timeouts, Vms};
use crate::dns::NameService;
use crate::image_locks::ImageLocks;
use crate::server::Emitter;
use crate::store::{self, Store};

/// Short enough that the tests that wait for a timeout take a moment, long enough for a loaded
/// two-core machine to do what the others wait for.
const TIMEOUTS: Timeouts = Timeouts {
    boot: Duration::from_secs(2),
    sshd: Duration::from_millis(300),
    graceful_stop: Duration::from_millis(300),
    poweroff: Duration::from_secs(2),
    reconnect: Duration::from_secs(2),
    supervise_every: Duration::from_millis(20),
};

/// The image settings OCI images hand their agent.
const RUNTIME_JSON: &str = r#"{"env":["APP=1"],"working_dir":"/srv","user":null}"#;
const MODULES: &[u8] = b"modules-cpio-of-the-generic-kernel";
const AGENT: &[u8] = b"\x7fELF the guest agent";

/// A recording `.vm` name service: whether it serves, and what.
#[derive(Default)]
struct FakeNames {
    serving: AtomicBool,
    /// The next start fails, as when another program holds the server's port.
    refuse: AtomicBool,
    names: Mutex<Vec<(String, Ipv4Addr)>>,
    egress: Mutex<Vec<(String, Ipv4Addr, banger_net::Egress)>>,
}

impl NameService for FakeNames {
    fn set_names(&self, entries: Vec<(String, Ipv4Addr)>) {
        *self.names.lock().unwrap() = entries;
    }
    fn set_egress(&self, entries: Vec<(String, Ipv4Addr, banger_net::Egress)>) {
        *self.egress.lock().unwrap() = entries;
    }
    fn ensure_running(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        if self.refuse.swap(false, Ordering::SeqCst) {
            return Box::pin(async {
                // As the real server fails: the bind's io error under what it was binding.
                Err(
                    anyhow::Error::new(std::io::Error::from(std::io::ErrorKind::AddrInUse))
                        .context("cannot listen for DNS on 172.16.0.1:10053 (udp)"),
                )
            });
        }
        self.serving.store(true, Ordering::SeqCst);
        Box::pin(async { Ok(()) })
    }
    fn stop(&self) -> BoxFuture<'_, ()> {
        self.serving.store(false, Ordering::SeqCst);
        Box::pin(async {})
    }
    fn status(&self) -> DnsStatus {
        DnsStatus {
            serving: self.serving.load(Ordering::SeqCst),
            address: "172.16.0.1:53".into(),
            names: self.names.lock().unwrap().len(),
            routed_by_resolved: false,
        }
    }
}

impl FakeNames {
    fn serving(&self) -> bool {
        self.serving.load(Ordering::SeqCst)
    }
    fn names(&self) -> Vec<String> {
        self.names
            .lock()
            .unwrap()
            .iter()
            .map(|(n, _)| n.clone())
            .collect()
    }
}

/// sshd in the fake guests: answers unless told not to, and counts the questions.
struct FakeSshd {
    up: AtomicBool,
    asked: AtomicUsize,
}

impl SshdProbe for FakeSshd {
    fn answers(&self, _addr: Ipv4Addr) -> BoxFuture<'_, bool> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        let up = self.up.load(Ordering::SeqCst);
        Box::pin(async move { up })
    }
}

/// What the guests' agents share: where they run commands, and whether they answer at all.
struct Guests {
    cwd: tempfile::TempDir,
    etc: tempfile::TempDir,
    agents_answer: AtomicBool,
    power_offs: AtomicUsize,
    /// What the guests were asked to become (after a restore).
    identities: Arc<banger_agent::guest::identity::RecordingIdentity>,
}

/// The agent's power-off in a fake guest: the guest's VMM ends (unless the fake VMM has its
/// guests ignore shutdown requests).
struct FakePower {
    vm: String,
    vmm: Weak<FakeVmm>,
    guests: Arc<Guests>,
}

impl PowerControl for FakePower {
    fn power_off(&self, accepted: &dyn Fn(Result<(), String>)) {
        self.guests.power_offs.fetch_add(1, Ordering::SeqCst);
        accepted(Ok(()));
        if let Some(vmm) = self.vmm.upgrade() {
            vmm.power_off(&self.vm);
        }
    }
}

/// What outlives a daemon: HOME with the store and the images, the host network, the VMM
/// processes and the guests.
struct Host {
    dir: tempfile::TempDir,
    paths: Paths,
    net: Arc<Network<FakeHostNet>>,
    vmm: Arc<FakeVmm>,
    sshd: Arc<FakeSshd>,
    guests: Arc<Guests>,
    /// The name service of the latest daemon (it dies with its daemon).
    dns: Mutex<Arc<FakeNames>>,
}

fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{cmd:?}: {out:?}");
}

/// An ext4 image with the directories banger writes its files into.
fn make_rootfs(path: &Path, scratch: &Path) {
    let tree = scratch.join("tree");
    for d in [
        "usr/local/bin",
        "etc/systemd/system/multi-user.target.wants",
        "etc/ssh",
    ] {
        std::fs::create_dir_all(tree.join(d)).unwrap();
    }
    std::fs::File::create(path)
        .unwrap()
        .set_len(16 << 20)
        .unwrap();
    run(std::process::Command::new("mkfs.ext4")
        .args(["-q", "-F", "-d"])
        .arg(&tree)
        .arg(path));
    std::fs::remove_dir_all(&tree).unwrap();
}

impl Host {
    fn new() -> Host {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let paths = Paths {
            config_dir: d.join("config"),
            state_dir: d.join("state"),
            cache_dir: d.join("cache"),
            runtime_dir: d.join("run"),
        };
        for p in [&paths.state_dir, &paths.runtime_dir, &d.join("images")] {
            std::fs::create_dir_all(p).unwrap();
        }
        std::fs::write(d.join("banger-agent"), AGENT).unwrap();
        let host = Host {
            paths,
            net: Arc::new(Network::new(FakeHostNet::new(), BridgeConfig::default())),
            vmm: Arc::new(FakeVmm::new()),
            sshd: Arc::new(FakeSshd {
                up: AtomicBool::new(true),
                asked: AtomicUsize::new(0),
            }),
            guests: Arc::new(Guests {
                cwd: tempfile::tempdir().unwrap(),
                etc: tempfile::tempdir().unwrap(),
                agents_answer: AtomicBool::new(true),
                power_offs: AtomicUsize::new(0),
                identities: Arc::default(),
            }),
            dns: Mutex::default(),
            dir,
        };
        host.serve_agents();
        host.add_images();
        host
    }

    /// Every guest runs the real agent serve loop on its end of the channel.
    fn serve_agents(&self) {
        std::fs::write(
            self.guests.etc.path().join("passwd"),
            "root:x:0:0:root:/root:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(self.guests.etc.path().join("group"), "root:x:0:\n").unwrap();
        let vmm = Arc::downgrade(&self.vmm);
        let guests = self.guests.clone();
        self.vmm
            .serve_agent(Arc::new(move |vm: &str, stream: StdUnixStream| {
                if !guests.agents_answer.load(Ordering::SeqCst) {
                    // No agent in this guest: the channel opens and closes unanswered.
                    return;
                }
                let cfg = Arc::new(ServeConfig {
                    default_cwd: guests.cwd.path().to_path_buf(),
                    base_env: BASE_ENV
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_string()))
                        .collect(),
                    user: None,
                    etc: guests.etc.path().to_path_buf(),
                    power: Arc::new(FakePower {
                        vm: vm.to_owned(),
                        vmm: vmm.clone(),
                        guests: guests.clone(),
                    }),
                    identity: guests.identities.clone(),
                });
                std::thread::spawn(move || {
                    let writer = Arc::new(FrameWriter::new(stream.try_clone().unwrap()));
                    let _ = serve_session(&stream, &writer, &cfg);
                });
            }));
    }

    /// `debian` (systemd boot, its own kernel and initrd) and `busybox` (agent boot, the
    /// generic kernel whose initrd holds modules), plus broken ones for the failure tests.
    fn add_images(&self) {
        let d = self.dir.path().join("images");
        make_rootfs(&d.join("rootfs.ext4"), &d);
        std::fs::write(d.join("vmlinuz"), b"kernel").unwrap();
        std::fs::write(d.join("initrd.img"), b"debian initrd").unwrap();
        std::fs::write(d.join("modules.img"), MODULES).unwrap();
        std::fs::write(d.join("not-ext4"), vec![0u8; 1 << 20]).unwrap();
        let path = |f: &str| d.join(f).display().to_string();
        let kernel = |name: &str, initrd: Option<&str>| KernelInfo {
            name: name.into(),
            source: Source::Registered,
            kernel: path("vmlinuz"),
            kernel_sha256: "aa".into(),
            initrd: initrd.map(path),
            initrd_sha256: None,
            created_at: "2026-01-01T00:00:00Z".into(),
        };
        let image = |name: &str, rootfs: &str, kernel: &str, boot: Boot| ImageInfo {
            name: name.into(),
            source: Source::Registered,
            origin: "test".into(),
            rootfs: path(rootfs),
            rootfs_sha256: Some("bb".into()),
            size_bytes: 16 << 20,
            kernel: kernel.into(),
            created_at: "2026-01-01T00:00:00Z".into(),
            boot,
            oci: None,
            snapshot_bytes: 0,
        };
        let store = self.store();
        let conn = rusqlite::Connection::open(self.paths.database()).unwrap();
        drop(store);
        conn.pragma_update(None, "foreign_keys", "ON").unwrap();
        store::insert_kernel(&conn, &kernel("debian", Some("initrd.img"))).unwrap();
        store::insert_kernel(&conn, &kernel("generic", Some("modules.img"))).unwrap();
        store::insert_kernel(&conn, &kernel("bare", None)).unwrap();
        for img in [
            image("debian", "rootfs.ext4", "debian", Boot::Systemd),
            image("busybox", "rootfs.ext4", "generic", Boot::Agent),
            image("missing-rootfs", "no-such-file", "debian", Boot::Systemd),
            image("not-ext4", "not-ext4", "debian", Boot::Systemd),
            image("no-modules", "rootfs.ext4", "bare", Boot::Agent),
        ] {
            store::insert_image(&conn, &img).unwrap();
            if img.boot == Boot::Agent {
                store::set_oci_details(&conn, &img.name, RUNTIME_JSON, &[]).unwrap();
            }
        }
    }

    fn store(&self) -> Store {
        Store::open(&self.paths.database()).unwrap()
    }

    fn effects(&self, agent: AgentBinary) -> Effects {
        let dns = Arc::new(FakeNames::default());
        *self.dns.lock().unwrap() = dns.clone();
        let net: Arc<Network<dyn HostNet>> = self.net.clone();
        let vmm: Arc<dyn Vmm> = self.vmm.clone();
        Effects {
            net,
            vmms: Backends::only(vmm, "fake VMM (tests)"),
            dns,
            sshd: self.sshd.clone(),
            agent_binary: agent,
            timeouts: TIMEOUTS,
        }
    }

    /// A daemon over this host, as the daemon's start-up makes it (without reconcile).
    fn daemon(&self) -> Arc<Vms> {
        let agent = AgentBinary::At(self.dir.path().join("banger-agent"));
        self.daemon_with(agent)
    }

    /// A daemon without warm starts: the lifecycle tests count VMMs, snapshots and boots that
    /// warm snapshots would add to. The warm-start tests turn them on.
    fn daemon_with(&self, agent: AgentBinary) -> Arc<Vms> {
        self.daemon_configured(agent, cold_config())
    }

    fn daemon_configured(&self, agent: AgentBinary, config: Config) -> Arc<Vms> {
        Arc::new(Vms::new(
            self.paths.clone(),
            self.store(),
            config,
            ImageLocks::default(),
            self.effects(agent),
        ))
    }

    /// A daemon that reconciles first, as after a restart.
    async fn restarted_daemon(&self) -> Arc<Vms> {
        let vms = self.daemon();
        vms.reconcile().await.unwrap();
        vms
    }

    /// Runs `op` with a daemon of its own, then kills that daemon and all its tasks.
    fn crashing_daemon<F, Fut>(&self, op: F)
    where
        F: FnOnce(Arc<Vms>) -> Fut + Send + 'static,
        Fut: Future<Output = ()>,
    {
        let vms = self.daemon();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(op(vms));
            // Dropping the runtime ends every task the daemon spawned (supervisors, agent
            // connections), as the death of its process would.
            drop(rt);
        })
        .join()
        .unwrap();
    }

    fn dns(&self) -> Arc<FakeNames> {
        self.dns.lock().unwrap().clone()
    }

    fn host_net(&self) -> banger_net::fake::FakeState {
        self.net.host().state()
    }

    fn bridge_up(&self) -> bool {
        let state = self.host_net();
        state.bridges.contains_key(&BridgeName::default()) && state.nat.is_some()
    }

    fn taps(&self) -> Vec<String> {
        self.host_net()
            .taps
            .keys()
            .map(|t| t.as_str().to_owned())
            .collect()
    }

    fn vm_dir(&self, name: &str) -> PathBuf {
        self.paths.state_dir.join("vms").join(name)
    }

    fn run_dirs(&self) -> Vec<PathBuf> {
        match std::fs::read_dir(self.paths.runtime_dir.join("vms")) {
            Ok(entries) => entries.map(|e| e.unwrap().path()).collect(),
            Err(_) => Vec::new(),
        }
    }

    /// Nothing of `name` is left: no row (and so no lease), no files, no tap, no VMM, and
    /// with nothing else running, no bridge, NAT or name server either.
    async fn assert_nothing_left(&self, vms: &Vms, name: &str) {
        let listed: Vec<String> = vms
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|v| v.name)
            .collect();
        assert!(
            !listed.contains(&name.to_owned()),
            "{name} still listed: {listed:?}"
        );
        assert!(!self.vm_dir(name).exists(), "{name}'s directory is left");
        assert_eq!(
            self.run_dirs(),
            Vec::<PathBuf>::new(),
            "run directories left"
        );
        assert_eq!(self.taps(), Vec::<String>::new(), "taps left");
        assert!(
            self.net.host().state().guards.is_empty(),
            "a tap's guard outlived it"
        );
        assert!(!self.bridge_up(), "the bridge outlived the last VM");
        assert!(!self.dns().serving(), "the name server outlived the bridge");
        assert_eq!(self.vmm.running(), Vec::<String>::new(), "a VMM runs on");
    }
}

/// A config without warm starts (see `Host::daemon_with`).
fn cold_config() -> Config {
    Config {
        warm_starts: Some(false),
        ..Config::default()
    }
}

fn request(name: &str, image: &str, start: bool) -> CreateVmRequest {
    CreateVmRequest {
        name: Some(name.into()),
        image: image.into(),
        spec: VmSpec {
            vcpu: 1,
            memory_mib: 128,
            disk_bytes: 64 << 20,
        },
        start,
        file_sync: Vec::new(),
        host_access: false,
        allow_hosts: Vec::new(),
        no_network: false,
        from: None,
        cold: false,
    }
}

async fn create(vms: &Arc<Vms>, name: &str, image: &str) -> Result<VmInfo, ApiError> {
    vms.create(request(name, image, true), Emitter::sink())
        .await
}

/// Polls `cond` until it holds (5 s at most).
async fn eventually(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Runs `argv` in the VM through its agent and returns its stdout and exit status.
async fn exec(vms: &Vms, name: &str, argv: &[&str]) -> (String, i32) {
    use base64::Engine;
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    let req = ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        cwd: None,
        env: Vec::new(),
        stdin: false,
        tty: false,
        rows: None,
        cols: None,
        user: None,
    };
    vms.exec(name, req, tx).await.unwrap();
    let (mut out, mut code) = (Vec::new(), None);
    while let Some(ev) = rx.recv().await {
        match ev {
            ExecEvent::Stdout { data } => out.extend(
                base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap(),
            ),
            ExecEvent::Exit { code: c } => code = Some(c),
            _ => {}
        }
    }
    (String::from_utf8(out).unwrap(), code.unwrap())
}

fn stops(vmm: &FakeVmm) -> Vec<(Duration, bool)> {
    vmm.calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::Stop {
                graceful, forced, ..
            } => Some((graceful, forced)),
            _ => None,
        })
        .collect()
}

fn last_start(vmm: &FakeVmm) -> VmConfig {
    vmm.starts().pop().unwrap()
}

#[tokio::test]
async fn a_systemd_vm_boots_on_the_bridge_with_its_names_and_answers_through_its_agent() {
    let host = Host::new();
    let vms = host.daemon();
    let info = create(&vms, "web", "debian").await.unwrap();
    assert_eq!(info.state, VmState::Running);
    assert_eq!(info.ip, "172.16.0.2");
    assert!(info.ssh);

    // The VMM got the image's kernel and initrd, the VM's disks, its tap and MAC, and the
    // command line the agent reads its settings from.
    let cfg = last_start(&host.vmm);
    assert_eq!(
        cfg.initrd.as_deref(),
        Some(host.dir.path().join("images/initrd.img").as_path())
    );
    assert_eq!(cfg.root_disk, host.vm_dir("web").join("root.ext4"));
    let nic = cfg.net.unwrap();
    assert_eq!(nic.tap.as_str(), info.tap);
    assert_eq!(nic.mac.to_string(), info.mac);
    assert!(
        cfg.kernel_args.contains("systemd.show_status=0"),
        "{}",
        cfg.kernel_args
    );
    let settings = banger_agent::cmdline::parse(&cfg.kernel_args).settings;
    assert_eq!(settings.hostname.unwrap().as_str(), "web");
    assert_eq!(settings.ip.unwrap().to_string(), "172.16.0.2/24");

    // The host network exists for it, and its name is served and pinned.
    assert!(host.bridge_up());
    assert_eq!(host.taps(), [info.tap.as_str()]);
    // Its tap sends from the VM's own MAC and address only.
    let guards = host.net.host().state().guards;
    let guard = guards[&banger_net::TapName::parse(&info.tap).unwrap()];
    assert_eq!(
        (guard.mac, guard.ip.to_string()),
        (nic.mac, info.ip.clone())
    );
    assert!(host.dns().serving());
    assert_eq!(host.dns().names(), ["web"]);
    let known_hosts = std::fs::read_to_string(host.paths.known_hosts()).unwrap();
    assert!(
        known_hosts.contains("web.vm,172.16.0.2 ssh-ed25519 "),
        "{known_hosts}"
    );
    assert!(
        host.sshd.asked.load(Ordering::SeqCst) > 0,
        "start did not wait for sshd"
    );

    // banger's files went into the root disk with debugfs.
    let out = std::process::Command::new("debugfs")
        .args(["-R", "cat /usr/local/bin/banger-agent"])
        .arg(host.vm_dir("web").join("root.ext4"))
        .output()
        .unwrap();
    assert_eq!(out.stdout, AGENT);

    // The agent the daemon waited for runs commands.
    let (out, code) = exec(&vms, "web", &["sh", "-c", "echo hello from $0"]).await;
    assert_eq!((out.as_str(), code), ("hello from sh\n", 0));
}

#[tokio::test]
async fn an_agent_booted_vm_starts_with_an_initramfs_of_the_agent_and_waits_for_no_sshd() {
    let host = Host::new();
    host.sshd.up.store(false, Ordering::SeqCst);
    let vms = host.daemon();
    let info = create(&vms, "box", "busybox").await.unwrap();
    assert_eq!(info.state, VmState::Running);
    assert!(!info.ssh);
    assert_eq!(
        host.sshd.asked.load(Ordering::SeqCst),
        0,
        "asked a guest without sshd"
    );

    let cfg = last_start(&host.vmm);
    assert!(!cfg.kernel_args.contains("systemd"), "{}", cfg.kernel_args);
    // The kernel's modules first, then an archive with the agent as /init and the image's
    // settings, assembled for this start.
    let initrd = cfg.initrd.unwrap();
    assert!(
        initrd.starts_with(host.paths.runtime_dir.join("vms")),
        "{initrd:?}"
    );
    let bytes = std::fs::read(&initrd).unwrap();
    assert!(bytes.starts_with(MODULES));
    let find = |needle: &[u8]| bytes.windows(needle.len()).any(|w| w == needle);
    assert!(find(AGENT) && find(RUNTIME_JSON.as_bytes()) && find(b"banger/image.json"));

    // No host key, no ssh_config entry; the name is still served.
    assert!(!host.vm_dir("box").join("ssh_host_ed25519_key").exists());
    let ssh_config = std::fs::read_to_string(host.paths.ssh_config()).unwrap();
    assert!(!ssh_config.contains("box.vm"), "{ssh_config}");
    assert_eq!(host.dns().names(), ["box"]);
    let err = vms.ssh_target("box").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
}

#[tokio::test]
async fn create_rolls_back_at_each_failing_step_and_leaves_nothing_behind() {
    let host = Host::new();
    let vms = host.daemon();

    // Before anything is made.
    let err = vms
        .create(
            CreateVmRequest {
                spec: VmSpec {
                    vcpu: 0,
                    memory_mib: 128,
                    disk_bytes: 64 << 20,
                },
                ..request("x", "debian", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    host.assert_nothing_left(&vms, "x").await;
    let without_agent = host.daemon_with(AgentBinary::At(host.dir.path().join("missing")));
    let err = create(&without_agent, "x", "debian").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::MissingTool);
    host.assert_nothing_left(&vms, "x").await;

    // Preparing the disks: the image cannot be cloned; debugfs cannot write into it.
    let err = create(&vms, "x", "missing-rootfs").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::Internal, "{err:?}");
    assert!(
        err.message.contains("cannot clone the image"),
        "{}",
        err.message
    );
    host.assert_nothing_left(&vms, "x").await;
    let err = create(&vms, "x", "not-ext4").await.unwrap_err();
    assert!(err.message.contains("debugfs"), "{}", err.message);
    host.assert_nothing_left(&vms, "x").await;

    // Starting: no tap for it; the VMM refuses; an agent-booted VM's kernel has no modules.
    host.net.host().fail_creating_taps(true);
    let err = create(&vms, "x", "debian").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::VmmFailed);
    assert!(
        err.message.contains("cannot set up the network"),
        "{}",
        err.message
    );
    host.assert_nothing_left(&vms, "x").await;
    // The same for an existing VM: it stays, stopped, and the bridge goes again.
    vms.create(request("y", "debian", false), Emitter::sink())
        .await
        .unwrap();
    let err = vms.start("y", Emitter::sink()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::VmmFailed);
    assert!(!host.bridge_up(), "a failed start left the bridge behind");
    vms.delete("y", false).await.unwrap();
    host.net.host().fail_creating_taps(false);
    host.assert_nothing_left(&vms, "x").await;
    host.vmm.refuse_next_start();
    let err = create(&vms, "x", "debian").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::VmmFailed);
    assert!(err.message.contains("failed to start"), "{}", err.message);
    host.assert_nothing_left(&vms, "x").await;

    let err = create(&vms, "x", "no-modules").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidState);
    host.assert_nothing_left(&vms, "x").await;

    // Every lease was given back: the next VM gets the first address.
    let info = create(&vms, "x", "debian").await.unwrap();
    assert_eq!(info.ip, "172.16.0.2");
}

#[tokio::test]
async fn a_start_whose_name_server_cannot_hold_its_port_fails_and_leaves_nothing() {
    // Another program has the server's port: the port-53 redirect must not point there, so
    // the start fails, says why, and the network (redirect included) goes again.
    let host = Host::new();
    let vms = host.daemon();
    host.dns().refuse.store(true, Ordering::SeqCst);
    let err = create(&vms, "x", "debian").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InUse);
    assert!(err.message.contains("cannot serve DNS"), "{}", err.message);
    assert!(err.message.contains("address in use"), "{}", err.message);
    assert!(err.hints[0].contains("port 10053"), "{:?}", err.hints);
    assert!(host.vmm.running().is_empty(), "no VMM was started");
    assert!(
        host.net.host().state().nat.is_none(),
        "the redirect outlived the failed start"
    );
    host.assert_nothing_left(&vms, "x").await;
    // Once the port is free, the same VM starts.
    create(&vms, "x", "debian").await.unwrap();
}

#[tokio::test]
async fn host_access_is_per_vm_and_goes_with_its_tap() {
    let host = Host::new();
    let vms = host.daemon();
    let open = vms
        .create(
            CreateVmRequest {
                host_access: true,
                ..request("open", "debian", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap();
    let closed = create(&vms, "closed", "debian").await.unwrap();
    assert!(open.host_access && !closed.host_access);
    let guards = host.net.host().state().guards;
    let tap = |i: &VmInfo| banger_net::TapName::parse(&i.tap).unwrap();
    assert_eq!(guards[&tap(&open)].host, banger_net::HostAccess::Open);
    assert_eq!(guards[&tap(&closed)].host, banger_net::HostAccess::DnsOnly);
    // Kept across a restart, as the VM's own setting.
    vms.restart("open", Emitter::sink()).await.unwrap();
    assert!(vms.show("open").await.unwrap().host_access);
    assert_eq!(
        host.net.host().state().guards[&tap(&open)].host,
        banger_net::HostAccess::Open
    );
    vms.delete("open", true).await.unwrap();
    assert!(!host.net.host().state().guards.contains_key(&tap(&open)));
}

#[tokio::test]
async fn egress_combines_the_vms_flags_with_the_config_and_reaches_its_tap_and_dns() {
    use banger_net::{Egress, HostPattern, Outbound};
    let host = Host::new();
    let agent = || AgentBinary::At(host.dir.path().join("banger-agent"));
    let pattern = |s: &str| HostPattern::parse(s).unwrap();
    let mut config = cold_config();
    config.network.egress = Egress::Allow(vec![pattern("a.com")]);
    let vms = host.daemon_configured(agent(), config);
    let listed = create(&vms, "listed", "debian").await.unwrap();
    let extra = vms
        .create(
            CreateVmRequest {
                allow_hosts: vec!["B.com".into(), "*.c.org".into()],
                ..request("extra", "busybox", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap();
    let sealed = vms
        .create(
            CreateVmRequest {
                no_network: true,
                ..request("sealed", "busybox", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap();
    assert_eq!(listed.egress.mode, "allow");
    assert_eq!(listed.egress.hosts, ["a.com"]);
    assert_eq!(extra.egress.hosts, ["a.com", "b.com", "*.c.org"]);
    assert_eq!(sealed.egress.mode, "none");
    let tap = |i: &VmInfo| banger_net::TapName::parse(&i.tap).unwrap();
    let guards = host.net.host().state().guards;
    assert_eq!(guards[&tap(&listed)].outbound, Outbound::Filtered);
    assert_eq!(guards[&tap(&extra)].outbound, Outbound::Filtered);
    assert_eq!(guards[&tap(&sealed)].outbound, Outbound::Sealed);
    // DNS knows each VM's policy by its address.
    let dns = host.dns.lock().unwrap().clone();
    let policies = dns.egress.lock().unwrap().clone();
    let of = |name: &str| policies.iter().find(|(n, ..)| n == name).cloned().unwrap();
    assert_eq!(of("sealed").2, Egress::Sealed);
    assert_eq!(of("extra").1.to_string(), extra.ip);
    assert_eq!(
        of("extra").2,
        Egress::Allow(vec![pattern("a.com"), pattern("b.com"), pattern("*.c.org")])
    );

    // Flags that contradict each other, or a name that is not one, are refused before
    // anything is made.
    for (req, says) in [
        (
            CreateVmRequest {
                no_network: true,
                allow_hosts: vec!["a.com".into()],
                ..request("bad", "busybox", true)
            },
            "--no-network and --allow-host",
        ),
        (
            CreateVmRequest {
                no_network: true,
                host_access: true,
                ..request("bad", "busybox", true)
            },
            "--no-network and --host-access",
        ),
        (
            CreateVmRequest {
                allow_hosts: vec!["a.com; rm -rf /".into()],
                ..request("bad", "busybox", true)
            },
            "is not a host name",
        ),
    ] {
        let err = vms.create(req, Emitter::sink()).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest, "{}", err.message);
        assert!(err.message.contains(says), "{}", err.message);
        assert!(!err.hints.is_empty(), "{}", err.message);
    }
    assert!(vms.show("bad").await.is_err());

    // A restart keeps the VM's own flags.
    vms.restart("sealed", Emitter::sink()).await.unwrap();
    assert_eq!(
        host.net.host().state().guards[&tap(&sealed)].outbound,
        Outbound::Sealed
    );

    // The config changes and the daemon restarts: running VMs are put under the new policy
    // at once (their own flags still count), and so is every later start. (The old daemon's
    // tasks live on in this runtime, as a crashed daemon's VMMs do: nothing here stops a VM
    // under them.)
    drop(vms);
    let vms = host.daemon_configured(agent(), cold_config());
    vms.reconcile().await.unwrap();
    let guards = host.net.host().state().guards;
    assert_eq!(guards[&tap(&listed)].outbound, Outbound::Open);
    assert_eq!(guards[&tap(&extra)].outbound, Outbound::Filtered);
    assert_eq!(vms.show("listed").await.unwrap().egress.mode, "open");
    assert_eq!(
        vms.show("extra").await.unwrap().egress.hosts,
        ["b.com", "*.c.org"]
    );
}

#[tokio::test]
async fn snapshots_of_running_vms_are_taken_listed_and_deleted_whole() {
    let host = Host::new();
    let vms = host.daemon();
    create(&vms, "web", "debian").await.unwrap();
    let first = vms.snapshot("web", None).await.unwrap();
    assert_eq!(first.name, "web-1");
    assert_eq!((first.vm.as_str(), first.image.as_str()), ("web", "debian"));
    assert_eq!(first.vmm, "qemu");
    let dir = PathBuf::from(&first.dir);
    // The disks as they were while the guest was paused, next to the VMM's files.
    for disk in ["root.ext4", "work.ext4"] {
        assert_eq!(
            std::fs::read(dir.join(disk)).unwrap(),
            std::fs::read(host.paths.state_dir.join("vms/web").join(disk)).unwrap(),
            "{disk}"
        );
    }
    assert!(dir.join("vm-snapshot.json").is_file());
    assert!(first.bytes > 0);
    assert!(host
        .vmm
        .calls()
        .iter()
        .any(|c| matches!(c, banger_vmm::testkit::FakeCall::Snapshot { vm, .. } if vm == "web")));
    // The VM runs on.
    assert_eq!(vms.show("web").await.unwrap().state, VmState::Running);
    let second = vms.snapshot("web", None).await.unwrap();
    assert_eq!(second.name, "web-2");
    let named = vms.snapshot("web", Some("base".into())).await.unwrap();
    assert_eq!(named.name, "base");
    let err = vms.snapshot("web", Some("base".into())).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::AlreadyExists);
    let err = vms
        .snapshot("web", Some("Bad Name".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest);
    let names: Vec<String> = vms
        .list_snapshots()
        .await
        .unwrap()
        .into_iter()
        .map(|s| s.name)
        .collect();
    assert_eq!(names, ["base", "web-1", "web-2"]);

    // Only a running VM.
    vms.stop("web", true).await.unwrap();
    let err = vms.snapshot("web", None).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidState, "{}", err.message);
    assert!(err.hints[0].contains("banger vm start web"));

    // Deleting takes the files too; an unknown name lists the ones there are.
    vms.delete_snapshot("web-1").await.unwrap();
    assert!(!dir.exists());
    let err = vms.delete_snapshot("web-1").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.hints[0].contains("base, web-2"), "{:?}", err.hints);

    // What a crash mid-snapshot leaves is gone after the next start; recorded ones stay.
    let partial = host.paths.state_dir.join("snapshots/.web-3.partial");
    std::fs::create_dir_all(&partial).unwrap();
    std::fs::write(partial.join("vm.state"), "half").unwrap();
    let vms = host.restarted_daemon().await;
    assert!(!partial.exists());
    assert_eq!(vms.list_snapshots().await.unwrap().len(), 2);
    assert!(PathBuf::from(&named.dir).join("root.ext4").is_file());
}

#[tokio::test]
async fn vms_made_from_a_snapshot_are_restored_and_each_made_its_own() {
    let host = Host::new();
    let vms = host.daemon();
    create(&vms, "web", "debian").await.unwrap();
    vms.snapshot("web", Some("base".into())).await.unwrap();
    let mut made = Vec::new();
    for name in ["copy1", "copy2"] {
        let vm = vms
            .create(
                CreateVmRequest {
                    from: Some("base".into()),
                    // The snapshot's image and shape, whatever the request says.
                    spec: VmSpec {
                        vcpu: 4,
                        memory_mib: 4096,
                        disk_bytes: 1 << 30,
                    },
                    ..request(name, "busybox", true)
                },
                Emitter::sink(),
            )
            .await
            .unwrap();
        assert_eq!(vm.state, VmState::Running);
        assert_eq!(vm.image, "debian");
        made.push(vm);
    }
    let web = vms.show("web").await.unwrap();
    assert_eq!(made[0].spec, web.spec);
    // Each its own lease, MAC and tap, restored (not booted) from the snapshot's files.
    let ips: std::collections::BTreeSet<_> = [&web, &made[0], &made[1]]
        .iter()
        .map(|v| v.ip.clone())
        .collect();
    assert_eq!(ips.len(), 3);
    let restores: Vec<VmConfig> = host
        .vmm
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            banger_vmm::testkit::FakeCall::Restore { cfg, snapshot } => {
                assert!(
                    snapshot.ends_with("snapshots/base"),
                    "{}",
                    snapshot.display()
                );
                Some(cfg)
            }
            _ => None,
        })
        .collect();
    assert_eq!(restores.len(), 2);
    assert_eq!(
        restores[0].net.as_ref().unwrap().mac.to_string(),
        made[0].mac
    );
    assert_ne!(
        restores[0].net.as_ref().unwrap().tap.as_str(),
        restores[1].net.as_ref().unwrap().tap.as_str()
    );
    // The disks are the snapshot's copies.
    assert_eq!(
        std::fs::read(host.paths.state_dir.join("vms/copy1/work.ext4")).unwrap(),
        std::fs::read(host.paths.state_dir.join("snapshots/base/work.ext4")).unwrap()
    );
    // Each guest was told who it is before it was reported running: its own address, MAC,
    // name, machine-id, random seed and SSH host key (the one pinned for it).
    let seen = host.guests.identities.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    for (identity, vm) in seen.iter().zip(&made) {
        assert_eq!(identity.boot.ip.unwrap().addr().to_string(), vm.ip);
        assert_eq!(
            banger_agent::guest::network::format_mac(identity.mac),
            vm.mac
        );
        assert_eq!(
            identity.boot.hostname.as_ref().unwrap().to_string(),
            vm.name
        );
        let pinned = std::fs::read_to_string(
            host.paths
                .state_dir
                .join("vms")
                .join(&vm.name)
                .join("ssh_host_ed25519_key.pub"),
        )
        .unwrap();
        assert_eq!(
            identity.ssh_host_key.as_ref().unwrap().public,
            pinned.trim_end()
        );
    }
    assert_ne!(seen[0].machine_id, seen[1].machine_id);
    assert_ne!(seen[0].seed, seen[1].seed);
    let known_hosts = std::fs::read_to_string(host.paths.known_hosts()).unwrap();
    assert!(
        known_hosts.contains("copy1.vm") && known_hosts.contains("copy2.vm"),
        "{known_hosts}"
    );

    // An unknown snapshot, and one whose image is gone, are refused before anything is made.
    let err = vms
        .create(
            CreateVmRequest {
                from: Some("nope".into()),
                ..request("x", "debian", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.hints[0].contains("base"), "{:?}", err.hints);
    host.store()
        .call(|c| {
            c.execute(
                "UPDATE snapshots SET image = 'deleted-image' WHERE name = 'base'",
                [],
            )?;
            Ok(())
        })
        .await
        .unwrap();
    let err = vms
        .create(
            CreateVmRequest {
                from: Some("base".into()),
                ..request("y", "debian", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::NotFound);
    assert!(err.message.contains("deleted-image"), "{}", err.message);
    assert!(vms.show("y").await.is_err());
}

#[tokio::test]
async fn a_fork_makes_running_children_named_after_the_parent_and_keeps_no_snapshot() {
    let host = Host::new();
    let vms = host.daemon();
    create(&vms, "web", "debian").await.unwrap();
    let kids = vms.fork("web", 2, Emitter::sink()).await.unwrap();
    let names: Vec<&str> = kids.iter().map(|v| v.name.as_str()).collect();
    assert_eq!(names, ["web-1", "web-2"]);
    assert!(kids
        .iter()
        .all(|v| v.state == VmState::Running && v.image == "debian"));
    assert_eq!(host.guests.identities.seen.lock().unwrap().len(), 2);
    assert!(
        vms.list_snapshots().await.unwrap().is_empty(),
        "the fork's snapshot stayed"
    );
    assert_eq!(vms.show("web").await.unwrap().state, VmState::Running);
    // The next fork takes the next free names.
    let more = vms.fork("web", 1, Emitter::sink()).await.unwrap();
    assert_eq!(more[0].name, "web-3");
    for bad in [0, super::fork::MAX_FORKS + 1] {
        let err = vms.fork("web", bad, Emitter::sink()).await.unwrap_err();
        assert_eq!(err.code, ErrorCode::BadRequest);
    }
    vms.stop("web", true).await.unwrap();
    let err = vms.fork("web", 1, Emitter::sink()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidState);
}

#[tokio::test]
async fn a_guest_that_never_becomes_ready_is_kept_for_inspection_until_deleted() {
    let host = Host::new();
    let vms = host.daemon();
    host.guests.agents_answer.store(false, Ordering::SeqCst);
    let err = create(&vms, "mute", "debian").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BootTimeout);
    assert!(
        err.message.contains("did not become ready"),
        "{}",
        err.message
    );
    assert_eq!(vms.show("mute").await.unwrap().state, VmState::Running);
    assert_eq!(host.vmm.running(), ["mute"]);

    host.guests.agents_answer.store(true, Ordering::SeqCst);
    host.sshd.up.store(false, Ordering::SeqCst);
    let err = create(&vms, "nossh", "debian").await.unwrap_err();
    assert_eq!(err.code, ErrorCode::BootTimeout);
    assert!(
        err.message.contains("sshd does not answer"),
        "{}",
        err.message
    );
    assert_eq!(host.vmm.running(), ["mute", "nossh"]);

    for name in ["mute", "nossh"] {
        assert_eq!(
            vms.delete(name, false).await.unwrap_err().code,
            ErrorCode::InvalidState
        );
        vms.delete(name, true).await.unwrap();
    }
    host.assert_nothing_left(&vms, "mute").await;
}

#[tokio::test]
async fn a_vm_whose_vmm_died_is_marked_stopped_and_starts_again() {
    let host = Host::new();
    let vms = host.daemon();
    let info = create(&vms, "web", "debian").await.unwrap();
    assert!(host.vmm.crash("web"));

    // The supervisor notices, records it and frees the network.
    for _ in 0..500 {
        if vms.show("web").await.unwrap().state == VmState::Stopped {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let shown = vms.show("web").await.unwrap();
    assert_eq!(shown.state, VmState::Stopped);
    assert_eq!(shown.last_error.as_deref(), Some("the VMM process exited"));
    assert_eq!(shown.pid, None);
    eventually("the network is released", || !host.bridge_up()).await;
    assert_eq!(host.taps(), Vec::<String>::new());
    assert!(!host.dns().serving());

    let again = vms.start("web", Emitter::sink()).await.unwrap();
    assert_eq!(again.state, VmState::Running);
    assert_eq!(
        (again.ip.as_str(), again.tap.as_str()),
        (info.ip.as_str(), info.tap.as_str())
    );
    assert_ne!(again.pid, info.pid);
    assert_eq!(host.vmm.starts().len(), 2);
    assert!(host.bridge_up());
    let (out, _) = exec(&vms, "web", &["echo", "back"]).await;
    assert_eq!(out, "back\n");
}

#[tokio::test]
async fn a_refused_start_keeps_the_whole_cause_and_every_hint() {
    let host = Host::new();
    let vms = host.daemon();
    create(&vms, "web", "debian").await.unwrap();
    vms.stop("web", true).await.unwrap();
    let console = vms.show("web").await.unwrap().console_log;

    // A VmmError whose message leaves its cause to `source()`: the cause is in the message.
    host.vmm.refuse_next_start_with(banger_vmm::VmmError::Io {
        vm: "web".into(),
        action: "cannot remove a stale file from the run directory".into(),
        source: std::io::Error::new(std::io::ErrorKind::PermissionDenied, "permission denied"),
    });
    let err = vms.start("web", Emitter::sink()).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::VmmFailed);
    assert_eq!(
        err.message,
        "VM web failed to start: VM web: cannot remove a stale file from the run directory: \
         permission denied"
    );
    assert_eq!(err.hints, [format!("console log: {console}")]);
    let shown = vms.show("web").await.unwrap();
    assert_eq!(shown.state, VmState::Failed);
    assert_eq!(
        shown.last_error.as_deref(),
        Some(format!("{}\nhint: console log: {console}", err.message).as_str())
    );

    // A VmmError with a hint of its own: both hints, the VMM's first.
    host.vmm.refuse_next_start();
    let err = vms.start("web", Emitter::sink()).await.unwrap_err();
    assert!(
        err.message
            .starts_with("VM web failed to start: VM web: qemu exited during start-up"),
        "{}",
        err.message
    );
    assert_eq!(err.hints.len(), 2, "{:?}", err.hints);
    assert!(err.hints[0].contains("`banger vm logs`"), "{:?}", err.hints);
    assert_eq!(err.hints[1], format!("console log: {console}"));
    let last_error = vms.show("web").await.unwrap().last_error.unwrap();
    assert!(
        last_error.contains("\nhint: the VMM's own log")
            && last_error.contains("\nhint: console log: "),
        "{last_error}"
    );

    // Nothing of either start stayed: the next one boots.
    assert_eq!(
        vms.start("web", Emitter::sink()).await.unwrap().state,
        VmState::Running
    );
}

#[tokio::test]
async fn stop_asks_the_guest_first_and_kills_only_after_the_grace_period() {
    let host = Host::new();
    let vms = host.daemon();

    // A guest that powers off when its agent asks: no kill, no waiting.
    create(&vms, "web", "debian").await.unwrap();
    let t = Instant::now();
    let info = vms.stop("web", false).await.unwrap();
    assert!(t.elapsed() < TIMEOUTS.graceful_stop, "waited for nothing");
    assert_eq!(info.state, VmState::Stopped);
    assert_eq!(host.guests.power_offs.load(Ordering::SeqCst), 1);
    assert_eq!(stops(&host.vmm), [(TIMEOUTS.graceful_stop, false)]);
    assert!(!host.bridge_up() && host.taps().is_empty());

    // A guest that ignores every request: the grace period runs out, then the kill.
    host.vmm.ignore_shutdown(true);
    vms.start("web", Emitter::sink()).await.unwrap();
    let t = Instant::now();
    let info = vms.stop("web", false).await.unwrap();
    assert!(t.elapsed() >= TIMEOUTS.graceful_stop);
    assert_eq!(info.state, VmState::Stopped);
    assert_eq!(host.guests.power_offs.load(Ordering::SeqCst), 2);
    assert_eq!(stops(&host.vmm)[1], (TIMEOUTS.graceful_stop, true));

    // --force: no question to the guest, no grace.
    vms.start("web", Emitter::sink()).await.unwrap();
    vms.stop("web", true).await.unwrap();
    assert_eq!(host.guests.power_offs.load(Ordering::SeqCst), 2);
    assert_eq!(stops(&host.vmm)[2], (Duration::ZERO, true));

    // A VMM that even a kill does not end: the VM is failed, and still owns its network.
    host.vmm.survive_kill(true);
    let running = vms.start("web", Emitter::sink()).await.unwrap();
    let err = vms.stop("web", true).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::VmmFailed);
    assert!(err.hints[0].contains("stuck in the kernel"), "{err:?}");
    let failed = vms.show("web").await.unwrap();
    assert_eq!(failed.state, VmState::Failed);
    assert_eq!(
        failed.last_error,
        Some(format!("{}\nhint: {}", err.message, err.hints[0]))
    );
    assert_eq!(failed.pid, running.pid);
    assert!(host.bridge_up());
}

#[tokio::test]
async fn deleting_a_running_vm_needs_force_and_then_removes_everything() {
    let host = Host::new();
    let vms = host.daemon();
    create(&vms, "web", "debian").await.unwrap();
    let err = vms.delete("web", false).await.unwrap_err();
    assert_eq!(err.code, ErrorCode::InvalidState);
    assert!(err.hints[0].contains("--force"), "{err:?}");
    assert_eq!(host.vmm.running(), ["web"]);

    vms.delete("web", true).await.unwrap();
    assert_eq!(stops(&host.vmm), [(Duration::ZERO, true)]);
    host.assert_nothing_left(&vms, "web").await;
    assert!(host.dns().names().is_empty());
    let known_hosts = std::fs::read_to_string(host.paths.known_hosts()).unwrap();
    assert!(!known_hosts.contains("web.vm"), "{known_hosts}");
}

#[tokio::test]
async fn reconcile_rolls_back_a_vm_whose_creation_was_interrupted() {
    let host = Host::new();
    let vms = host.daemon();
    let info = vms
        .create(request("half", "debian", false), Emitter::sink())
        .await
        .unwrap();
    // The crash came before create recorded it stopped; a tap of it was left on the host.
    let store = host.store();
    store
        .call(|c| store::set_vm_state(c, "half", VmState::Creating, None, None, None))
        .await
        .unwrap();
    host.net
        .host()
        .add_tap(TapName::parse(&info.tap).unwrap(), 0);
    drop(vms);

    let vms = host.restarted_daemon().await;
    host.assert_nothing_left(&vms, "half").await;
}

#[tokio::test]
async fn reconcile_stops_a_vmm_that_was_started_but_never_recorded() {
    let host = Host::new();
    let vms = host.daemon();
    let info = vms
        .create(request("web", "debian", false), Emitter::sink())
        .await
        .unwrap();
    drop(vms);
    // What start did before the crash: the network and the tap, then the VMM; the handle
    // was never written down.
    let id = info.tap.strip_prefix("bg-").unwrap();
    let ip: std::net::Ipv4Addr = info.ip.parse().unwrap();
    let guard = banger_net::PortGuard::new(banger_net::Mac::for_ip(ip), ip);
    host.net
        .attach_vm(id, nix::unistd::geteuid(), guard)
        .unwrap();
    let run_dir = host.paths.runtime_dir.join("vms").join(id);
    std::fs::create_dir_all(&run_dir).unwrap();
    let images = host.dir.path().join("images");
    let dir = host.vm_dir("web");
    host.vmm
        .start(&VmConfig {
            name: "web".into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: images.join("vmlinuz"),
            initrd: Some(images.join("initrd.img")),
            kernel_args: String::new(),
            root_disk: dir.join("root.ext4"),
            work_disk: dir.join("work.ext4"),
            net: None,
            vsock_cid: None,
            run_dir,
            console_log: dir.join("console.log"),
        })
        .await
        .unwrap();

    let vms = host.restarted_daemon().await;
    assert_eq!(
        host.vmm.running(),
        Vec::<String>::new(),
        "the VMM runs on, unreachable"
    );
    assert_eq!(stops(&host.vmm), [(Duration::ZERO, true)]);
    assert_eq!(vms.show("web").await.unwrap().state, VmState::Stopped);
    assert_eq!(host.taps(), Vec::<String>::new());
    assert!(!host.bridge_up());
    // And it starts as any stopped VM does.
    vms.start("web", Emitter::sink()).await.unwrap();
    assert_eq!(host.vmm.running(), ["web"]);
}

#[tokio::test]
async fn reconcile_marks_a_vm_whose_vmm_died_with_the_daemon_stopped() {
    let host = Host::new();
    host.crashing_daemon(|vms| async move {
        create(&vms, "web", "debian").await.unwrap();
    });
    assert!(host.vmm.crash("web"));

    let vms = host.restarted_daemon().await;
    let info = vms.show("web").await.unwrap();
    assert_eq!((info.state, info.pid), (VmState::Stopped, None));
    assert_eq!(host.taps(), Vec::<String>::new());
    assert!(!host.bridge_up());
    assert!(!host.dns().serving());
    // Its name still resolves to it (a stopped VM keeps its name and address).
    assert_eq!(host.dns().names(), ["web"]);
}

#[tokio::test]
async fn reconcile_readopts_a_live_vmm_with_its_network_names_and_agent() {
    let host = Host::new();
    host.crashing_daemon(|vms| async move {
        create(&vms, "web", "debian").await.unwrap();
        create(&vms, "box", "busybox").await.unwrap();
    });
    let before = host.taps();
    assert_eq!(host.vmm.running(), ["web", "box"]);
    // The new daemon brings tables of its own (an upgrade): they start with empty sets.
    host.net.host().lose_tables();

    let vms = host.restarted_daemon().await;
    for name in ["web", "box"] {
        assert_eq!(vms.show(name).await.unwrap().state, VmState::Running);
    }
    assert_eq!(host.taps(), before, "the running VMs lost their taps");
    let guarded: Vec<String> = host
        .net
        .host()
        .state()
        .guards
        .keys()
        .map(|t| t.to_string())
        .collect();
    assert_eq!(
        guarded, before,
        "re-adopted VMs were cut off by the new tables"
    );
    assert!(host.bridge_up());
    assert!(host.dns().serving());
    assert_eq!(host.dns().names(), ["box", "web"]);
    assert_eq!(host.vmm.starts().len(), 2, "re-adopting started a VMM");
    // The agent is reached again through the VMM's channel.
    let (out, code) = exec(&vms, "box", &["echo", "still here"]).await;
    assert_eq!((out.as_str(), code), ("still here\n", 0));
    // And the VMs are supervised again.
    host.vmm.crash("web");
    eventually("the dead VM's tap is released", || host.taps().len() == 1).await;
    assert!(host.bridge_up(), "box still runs");
}

#[tokio::test]
async fn the_bridge_stays_while_another_vm_is_starting() {
    let host = Host::new();
    let vms = host.daemon();
    create(&vms, "first", "debian").await.unwrap();

    // "second" gets its tap, then its VMM start is held: the store does not show it running.
    host.vmm.hold_starts(true);
    let v = vms.clone();
    let second = tokio::spawn(async move { create(&v, "second", "debian").await });
    let vmm = host.vmm.clone();
    eventually("second's VMM is starting", || {
        vmm.starts().iter().any(|c| c.name == "second")
    })
    .await;

    // The last *recorded* VM stops; the bridge and names must stay for the one starting.
    vms.stop("first", false).await.unwrap();
    assert!(
        host.bridge_up(),
        "the bridge was torn down under a starting VM"
    );
    assert!(host.dns().serving());
    assert_eq!(host.taps().len(), 1);

    host.vmm.hold_starts(false);
    let info = second.await.unwrap().unwrap();
    assert_eq!(info.state, VmState::Running);
    vms.stop("second", false).await.unwrap();
    assert!(!host.bridge_up());
}

/// Five `vm create`s at once on a HOME without a user key, known_hosts or ssh_config: all
/// succeed, one user key is made and every guest authorises it, and each VM is pinned once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn five_vms_created_at_once_on_a_fresh_home_share_one_key_and_are_each_pinned() {
    let host = Host::new();
    let vms = host.daemon();
    assert!(!host.paths.config_dir.exists(), "HOME is not fresh");
    let names: Vec<String> = (1..=5).map(|i| format!("vm{i}")).collect();
    let creates: Vec<_> = names
        .iter()
        .map(|n| {
            let (vms, n) = (vms.clone(), n.clone());
            tokio::spawn(async move { create(&vms, &n, "debian").await })
        })
        .collect();
    let mut infos = Vec::new();
    for c in creates {
        let info = c.await.unwrap().unwrap();
        assert_eq!(info.state, VmState::Running);
        infos.push(info);
    }

    // One key pair, whole: its public half is the private key's, and nothing else is left.
    let ssh_dir = host.paths.ssh_dir();
    let mut files: Vec<String> = std::fs::read_dir(&ssh_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    files.sort();
    assert_eq!(files, ["id_ed25519", "id_ed25519.pub"]);
    let key = ssh_dir.join("id_ed25519");
    let derived = std::process::Command::new("ssh-keygen")
        .arg("-y")
        .arg("-f")
        .arg(&key)
        .output()
        .unwrap();
    assert!(derived.status.success(), "{derived:?}");
    let first_two = |s: &str| s.split_whitespace().take(2).collect::<Vec<_>>().join(" ");
    let public = first_two(&std::fs::read_to_string(ssh_dir.join("id_ed25519.pub")).unwrap());
    assert_eq!(
        first_two(&String::from_utf8(derived.stdout).unwrap()),
        public
    );

    let known_hosts = std::fs::read_to_string(host.paths.known_hosts()).unwrap();
    let pinned: Vec<&str> = known_hosts
        .lines()
        .filter(|l| !l.starts_with('#'))
        .collect();
    assert_eq!(pinned.len(), 5, "{known_hosts}");
    let ssh_config = std::fs::read_to_string(host.paths.ssh_config()).unwrap();
    for info in &infos {
        let name = &info.name;
        // The guest authorises the one user key.
        let out = std::process::Command::new("debugfs")
            .args(["-R", "cat /.ssh/authorized_keys"])
            .arg(host.vm_dir(name).join("work.ext4"))
            .output()
            .unwrap();
        assert_eq!(
            first_two(&String::from_utf8_lossy(&out.stdout)),
            public,
            "{name}"
        );
        // Its own host key is pinned under its name and address, once.
        let host_key =
            std::fs::read_to_string(host.vm_dir(name).join("ssh_host_ed25519_key.pub")).unwrap();
        let line = format!("{name}.vm,{} {}", info.ip, first_two(&host_key));
        assert_eq!(
            pinned.iter().filter(|l| **l == line).count(),
            1,
            "{line} in\n{known_hosts}"
        );
        let stanza = format!("Host {name}.vm\n");
        assert_eq!(
            ssh_config.matches(&stanza).count(),
            1,
            "{stanza} in\n{ssh_config}"
        );
        let target = vms.ssh_target(name).await.unwrap();
        assert_eq!(Path::new(&target.identity_file), key);
        assert_eq!(Path::new(&target.known_hosts), host.paths.known_hosts());
    }
    assert_eq!(
        ssh_config
            .lines()
            .filter(|l| l.starts_with("Host "))
            .count(),
        5,
        "{ssh_config}"
    );
}

/// Appends `n` bytes to `log` through an `O_APPEND` descriptor, as a VMM writes the console.
fn guest_writes(log: &Path, n: u64) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .unwrap();
    let line = [b'x'; 1023];
    for _ in 0..n / 1024 {
        f.write_all(&line).unwrap();
        f.write_all(b"\n").unwrap();
    }
}

fn size(p: &Path) -> u64 {
    std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
}

#[tokio::test]
async fn a_running_vms_console_log_is_capped_also_after_a_daemon_restart() {
    use crate::console_log::CAP;
    let host = Host::new();
    host.crashing_daemon(|vms| async move {
        create(&vms, "web", "debian").await.unwrap();
    });
    let log = host.vm_dir("web").join("console.log");
    let older = crate::console_log::older_path(&log);
    // No daemon watches: the guest writes past the cap.
    guest_writes(&log, CAP + (1 << 20));
    assert!(!older.exists());

    // The next daemon re-adopts the VM and rotates its log at once.
    let vms = host.restarted_daemon().await;
    eventually("the log is rotated", || older.exists() && size(&log) < CAP).await;
    assert_eq!(size(&older), CAP + (1 << 20));
    // And again as the guest goes on: two files, never a third.
    guest_writes(&log, CAP);
    eventually("the log is rotated again", || size(&log) < CAP).await;
    assert_eq!(size(&older), CAP);
    let mut files: Vec<String> = std::fs::read_dir(host.vm_dir("web"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("console") || n.starts_with(".console"))
        .collect();
    files.sort();
    assert_eq!(files, ["console.log", "console.log.1"]);

    // A new boot begins a log of its own.
    vms.restart("web", Emitter::sink()).await.unwrap();
    assert!(!older.exists(), "the last boot's older log is kept");
    assert_eq!(size(&log), 0);
}

/// Creates `name` from `image` on `vms`, and the notices it gave.
async fn create_noting(
    vms: &Arc<Vms>,
    req: CreateVmRequest,
) -> (Result<VmInfo, ApiError>, Vec<String>) {
    let (progress, mut rx) = Emitter::channel();
    let made = vms.create(req, progress).await;
    let mut notices = Vec::new();
    while let Ok(event) = rx.try_recv() {
        if let banger_api::Event::Notice { message } = event {
            notices.push(message);
        }
    }
    (made, notices)
}

fn restores(vmm: &FakeVmm) -> Vec<PathBuf> {
    vmm.calls()
        .into_iter()
        .filter_map(|c| match c {
            banger_vmm::testkit::FakeCall::Restore { snapshot, .. } => Some(snapshot),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn the_first_vm_of_an_image_and_shape_leaves_a_warm_snapshot_that_later_ones_start_from() {
    let host = Host::new();
    let agent = AgentBinary::At(host.dir.path().join("banger-agent"));
    let vms = host.daemon_configured(agent, Config::default());

    // The first boots, and a warm snapshot of it is kept, taken with its work disk unmounted
    // and mounted again after.
    let (first, notices) = create_noting(&vms, request("first", "debian", true)).await;
    let first = first.unwrap();
    assert_eq!(first.started_from, None);
    assert_eq!(first.state, VmState::Running);
    let snapshots = vms.list_snapshots().await.unwrap();
    assert_eq!(snapshots.len(), 1, "{snapshots:?}");
    let warm = &snapshots[0];
    assert!(warm.warm && warm.name.starts_with("warm-"), "{warm:?}");
    assert_eq!((warm.image.as_str(), warm.spec), ("debian", first.spec));
    assert!(
        notices.iter().any(|n| n.contains("kept warm snapshot")),
        "{notices:?}"
    );
    assert_eq!(
        *host.guests.identities.work_disk_calls.lock().unwrap(),
        [false, true]
    );
    assert!(restores(&host.vmm).is_empty());

    // The next of the same image and shape is restored from it, made its own, and mounts
    // its own work disk; its root disk is the snapshot's, its work disk its own.
    let (second, notices) = create_noting(&vms, request("second", "debian", true)).await;
    let second = second.unwrap();
    assert_eq!(second.started_from.as_deref(), Some(warm.name.as_str()));
    assert!(
        notices.is_empty() || !notices.iter().any(|n| n.contains("kept")),
        "{notices:?}"
    );
    assert_eq!(restores(&host.vmm).len(), 1);
    // The first took on its own host key after its snapshot (it booted with a throwaway one,
    // which is all the snapshot holds), then the second took on its identity.
    let seen = host.guests.identities.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2);
    let own_key = |vm: &str| {
        std::fs::read_to_string(
            host.paths
                .state_dir
                .join("vms")
                .join(vm)
                .join("ssh_host_ed25519_key"),
        )
        .unwrap()
    };
    assert_eq!(
        seen[0].ssh_host_key.as_ref().unwrap().private,
        own_key("first")
    );
    assert_eq!(
        seen[1].ssh_host_key.as_ref().unwrap().private,
        own_key("second")
    );
    let snapshot_root = std::fs::read(PathBuf::from(&warm.dir).join("root.ext4")).unwrap();
    for vm in ["first", "second"] {
        let key = own_key(vm);
        let secret = key.lines().nth(2).unwrap().as_bytes();
        assert!(
            !snapshot_root.windows(secret.len()).any(|w| w == secret),
            "{vm}'s host key is in the warm snapshot"
        );
    }
    assert!(
        !host
            .paths
            .state_dir
            .join("vms/first/warm_host_key")
            .exists(),
        "the throwaway key stayed"
    );
    assert_eq!(
        *host.guests.identities.work_disk_calls.lock().unwrap(),
        [false, true, true]
    );
    let vm_file = |vm: &str, f: &str| {
        std::fs::read(host.paths.state_dir.join("vms").join(vm).join(f)).unwrap()
    };
    assert_eq!(
        vm_file("second", "root.ext4"),
        std::fs::read(PathBuf::from(&warm.dir).join("root.ext4")).unwrap()
    );
    // No work disk in a warm snapshot: each VM has its own, with its own keys and files.
    assert!(!PathBuf::from(&warm.dir).join("work.ext4").exists());
    assert!(!vm_file("second", "work.ext4").is_empty());
    assert_eq!(vms.list_snapshots().await.unwrap().len(), 1);

    // `--cold` boots and keeps nothing; another shape boots and keeps its own.
    let (cold, _) = create_noting(
        &vms,
        CreateVmRequest {
            cold: true,
            ..request("cold", "debian", true)
        },
    )
    .await;
    assert_eq!(cold.unwrap().started_from, None);
    assert_eq!(restores(&host.vmm).len(), 1);
    assert_eq!(vms.list_snapshots().await.unwrap().len(), 1);
    let (bigger, _) = create_noting(
        &vms,
        CreateVmRequest {
            spec: VmSpec {
                vcpu: 2,
                memory_mib: 128,
                disk_bytes: 64 << 20,
            },
            ..request("bigger", "debian", true)
        },
    )
    .await;
    assert_eq!(bigger.unwrap().started_from, None);
    assert_eq!(vms.list_snapshots().await.unwrap().len(), 2);
}

#[tokio::test]
async fn a_warm_snapshot_goes_when_the_agent_changes_or_it_does_not_restore_and_with_its_image() {
    let host = Host::new();
    let agent_path = host.dir.path().join("banger-agent");
    let vms = host.daemon_configured(AgentBinary::At(agent_path.clone()), Config::default());
    create(&vms, "first", "debian").await.unwrap();
    let old = vms.list_snapshots().await.unwrap().remove(0);

    // A new agent: the snapshot is out of date, so it goes, this VM boots, and keeps a new one.
    std::fs::write(&agent_path, b"#!/bin/sh\n# a newer agent\n").unwrap();
    let (made, notices) = create_noting(&vms, request("second", "debian", true)).await;
    assert_eq!(made.unwrap().started_from, None);
    assert!(
        notices
            .iter()
            .any(|n| n.contains(&old.name) && n.contains("out of date: the guest agent changed")),
        "{notices:?}"
    );
    assert!(!PathBuf::from(&old.dir).exists());
    let new = vms.list_snapshots().await.unwrap();
    assert_eq!(new.len(), 1);
    assert_ne!(new[0].name, old.name);
    assert!(restores(&host.vmm).is_empty());

    // A damaged snapshot: the restore fails, the snapshot goes, the VM boots cold from its
    // image (and keeps a fresh snapshot), and says so.
    std::fs::write(
        PathBuf::from(&new[0].dir).join("vm-snapshot.json"),
        b"{garbage",
    )
    .unwrap();
    let (made, notices) = create_noting(&vms, request("third", "debian", true)).await;
    let made = made.unwrap();
    assert_eq!(made.state, VmState::Running);
    assert_eq!(made.started_from, None);
    assert!(
        notices
            .iter()
            .any(|n| n.contains(&new[0].name) && n.contains("could not be restored")),
        "{notices:?}"
    );
    assert_eq!(restores(&host.vmm).len(), 1);
    assert!(!PathBuf::from(&new[0].dir).exists());
    assert_eq!(host.vmm.running().len(), 3, "{:?}", host.vmm.running());

    // A root disk gone from the snapshot: the same, found before anything starts.
    let kept = vms.list_snapshots().await.unwrap().remove(0);
    std::fs::remove_file(PathBuf::from(&kept.dir).join("root.ext4")).unwrap();
    let (made, notices) = create_noting(&vms, request("fourth", "debian", true)).await;
    assert_eq!(made.unwrap().started_from, None);
    assert!(
        notices
            .iter()
            .any(|n| n.contains(&kept.name) && n.contains("boots cold")),
        "{notices:?}"
    );
    assert_eq!(restores(&host.vmm).len(), 1);
    let kept = vms.list_snapshots().await.unwrap().remove(0);

    // A warm snapshot only starts VMs; its prefix is banger's.
    let err = vms
        .create(
            CreateVmRequest {
                from: Some(kept.name.clone()),
                ..request("fifth", "debian", false)
            },
            Emitter::sink(),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{}", err.message);
    let err = vms
        .snapshot("first", Some("warm-mine".into()))
        .await
        .unwrap_err();
    assert_eq!(err.code, ErrorCode::BadRequest, "{}", err.message);
    // Named with --from, it starts a VM as a warm start would.
    let named = vms
        .create(
            CreateVmRequest {
                from: Some(kept.name.clone()),
                ..request("fifth", "debian", true)
            },
            Emitter::sink(),
        )
        .await
        .unwrap();
    assert_eq!(named.started_from.as_deref(), Some(kept.name.as_str()));

    // Deleting the image takes its warm snapshots with it (its VMs first).
    for vm in ["first", "second", "third", "fourth", "fifth"] {
        vms.delete(vm, true).await.unwrap();
    }
    let images = crate::images::Images::new(
        host.paths.clone(),
        host.store(),
        Config::default(),
        ImageLocks::default(),
    );
    let left = vms.list_snapshots().await.unwrap();
    assert_eq!(left.len(), 1);
    images.delete("debian").await.unwrap();
    assert!(vms.list_snapshots().await.unwrap().is_empty());
    assert!(!PathBuf::from(&left[0].dir).exists());
}

#[tokio::test]
async fn a_guest_that_cannot_give_up_or_take_back_its_work_disk_gets_no_warm_snapshot() {
    let host = Host::new();
    let agent = AgentBinary::At(host.dir.path().join("banger-agent"));
    let vms = host.daemon_configured(agent, Config::default());
    let refuse = |m: Option<bool>| *host.guests.identities.refuse_work_disk.lock().unwrap() = m;

    // `/root` busy: no snapshot, a notice why, and the VM is fine, its work disk (asked
    // back all the same) mounted and its own host key in place.
    refuse(Some(false));
    let (made, notices) = create_noting(&vms, request("busy", "debian", true)).await;
    assert_eq!(made.unwrap().state, VmState::Running);
    assert!(
        notices
            .iter()
            .any(|n| n.starts_with("no warm snapshot kept") && n.contains("cannot unmount")),
        "{notices:?}"
    );
    assert!(vms.list_snapshots().await.unwrap().is_empty());
    assert_eq!(
        *host.guests.identities.work_disk_calls.lock().unwrap(),
        [false, true]
    );
    assert_eq!(host.guests.identities.seen.lock().unwrap().len(), 1);
    vms.delete("busy", true).await.unwrap();

    // A guest that cannot mount its work disk again: the create fails and leaves neither the
    // VM nor a snapshot that every later VM would fail on the same way.
    refuse(Some(true));
    let err = create(&vms, "nohome", "debian").await.unwrap_err();
    assert!(
        err.message.contains("cannot mount its work disk again"),
        "{}",
        err.message
    );
    assert!(!err.hints.is_empty());
    host.assert_nothing_left(&vms, "nohome").await;
    assert!(vms.list_snapshots().await.unwrap().is_empty());
}
