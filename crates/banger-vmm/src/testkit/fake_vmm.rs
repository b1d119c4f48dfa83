//! [`FakeVmm`]: a [`Vmm`] that runs no process, for unprivileged tests of what drives a VMM
//! (the daemon's create, start, stop, delete, supervision and reconcile).
//!
//! It records every start and stop, and models the VMM processes it "started" as entries that
//! stay alive until stopped or killed; like real VMMs they outlive whoever started them, so a
//! second daemon over the same fake re-adopts them. Snapshots are recorded and write a small
//! state file and a real manifest around the caller's work; a restore checks that manifest like
//! the real backends do and then behaves like a start. A test can make the next start fail, make
//! VMMs die as soon as they started, make the guest ignore shutdown requests (so a stop waits out
//! its grace period and kills) or even a kill, crash a VMM at any time, and hold starts until
//! released (to catch what happens meanwhile). The guest agent's
//! channel is a socket pair: the test hands the guest's end to whatever plays the agent (the
//! real serve loop, typically), and a VMM that ends shuts that end down, as a dying guest would.

use std::io;
use std::os::unix::net::UnixStream as StdUnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::{
    check_inputs, AgentEndpoint, AgentStream, BackendKind, BoxFuture, Manifest, Shape,
    SnapshotInfo, SnapshotPaths, VmConfig, VmHandle, Vmm, VmmError, WhilePaused,
};

/// Plays the guest agent of a fake VM: called with the VM's name and the guest's end of each
/// new agent connection.
pub type GuestAgent = Arc<dyn Fn(&str, StdUnixStream) + Send + Sync>;

/// One call to the fake, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// A start, with everything it was asked to boot (also recorded when it was refused).
    Start(VmConfig),
    /// A stop of `vm` with this grace period. `forced` when the VMM still ran after it and was
    /// killed (always so without a grace period); false when the guest shut down when asked, or
    /// the VMM was gone already.
    Stop {
        vm: String,
        graceful: Duration,
        forced: bool,
    },
    /// A snapshot of `vm` into the directory `dest` (also recorded when it failed).
    Snapshot { vm: String, dest: PathBuf },
    /// A restore of `cfg` from the snapshot in `snapshot` (also recorded when it was refused).
    Restore { cfg: VmConfig, snapshot: PathBuf },
}

/// A VMM process the fake started.
struct Process {
    name: String,
    /// The shape a snapshot of it records.
    shape: Shape,
    run_dir: PathBuf,
    pid: i32,
    start_time: u64,
    /// `None` while it runs; how it ended once it has.
    ended: Option<&'static str>,
    /// The guest's ends of its agent connections, shut down when it ends.
    guest_ends: Vec<StdUnixStream>,
}

impl Process {
    fn end(&mut self, how: &'static str) {
        if self.ended.is_none() {
            self.ended = Some(how);
        }
        for end in self.guest_ends.drain(..) {
            let _ = end.shutdown(std::net::Shutdown::Both);
        }
    }
}

#[derive(Default)]
struct Inner {
    calls: Vec<FakeCall>,
    processes: Vec<Process>,
    next_pid: i32,
    refuse_next_start: bool,
    /// Refuses the next start with this error instead (taken by that start).
    next_start_error: Option<VmmError>,
    die_after_start: bool,
    ignore_shutdown: bool,
    survive_kill: bool,
    agent: Option<GuestAgent>,
}

/// A recording, in-memory [`Vmm`]. Its handles claim `kind` (QEMU unless told otherwise).
pub struct FakeVmm {
    kind: BackendKind,
    inner: Mutex<Inner>,
    /// True while starts wait (after they were recorded) for the test to let them go on.
    hold: tokio::sync::watch::Sender<bool>,
}

impl Default for FakeVmm {
    fn default() -> Self {
        FakeVmm::new()
    }
}

impl FakeVmm {
    pub fn new() -> FakeVmm {
        FakeVmm::with_kind(BackendKind::Qemu)
    }

    pub fn with_kind(kind: BackendKind) -> FakeVmm {
        FakeVmm {
            kind,
            inner: Mutex::new(Inner {
                // Far above any real pid_max, so a fake handle never names a real process.
                next_pid: 1 << 24,
                ..Inner::default()
            }),
            hold: tokio::sync::watch::Sender::new(false),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A test that panicked while holding the lock leaves plain data, still fine to read.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Hands the guest's end of every later agent connection to `agent`.
    pub fn serve_agent(&self, agent: GuestAgent) {
        self.lock().agent = Some(agent);
    }

    /// Makes the next start fail as a VMM that exits during start-up does.
    pub fn refuse_next_start(&self) {
        self.lock().refuse_next_start = true;
    }

    /// Makes the next start fail with `error` (one with a cause and a hint, say).
    pub fn refuse_next_start_with(&self, error: VmmError) {
        self.lock().next_start_error = Some(error);
    }

    /// While `yes`, every start is recorded and then waits until this is called with `false`.
    pub fn hold_starts(&self, yes: bool) {
        self.hold.send_replace(yes);
    }

    /// Every VMM started from now on dies right after its start returned.
    pub fn die_after_start(&self, yes: bool) {
        self.lock().die_after_start = yes;
    }

    /// Guests ignore requests to shut down (the agent's and the VMM's): a stop waits its whole
    /// grace period and then kills.
    pub fn ignore_shutdown(&self, yes: bool) {
        self.lock().ignore_shutdown = yes;
    }

    /// Even a kill does not end a VMM (a process stuck in the kernel): stops fail.
    pub fn survive_kill(&self, yes: bool) {
        self.lock().survive_kill = yes;
    }

    /// The VMM of `vm` dies unasked, as in a crash. False when none of its VMMs ran.
    pub fn crash(&self, vm: &str) -> bool {
        let mut inner = self.lock();
        let mut any = false;
        for p in inner
            .processes
            .iter_mut()
            .filter(|p| p.name == vm && p.ended.is_none())
        {
            p.end("killed by SIGSEGV");
            any = true;
        }
        any
    }

    /// The guest of `vm` powers itself off (what the agent's power-off does), unless guests
    /// ignore shutdown requests.
    pub fn power_off(&self, vm: &str) {
        let mut inner = self.lock();
        if inner.ignore_shutdown {
            return;
        }
        for p in inner.processes.iter_mut().filter(|p| p.name == vm) {
            p.end("exit status 0");
        }
    }

    /// Names of the VMs whose VMM runs, in start order.
    pub fn running(&self) -> Vec<String> {
        self.lock()
            .processes
            .iter()
            .filter(|p| p.ended.is_none())
            .map(|p| p.name.clone())
            .collect()
    }

    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// What every start was asked to boot, in order.
    pub fn starts(&self) -> Vec<VmConfig> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                FakeCall::Start(cfg) => Some(cfg.clone()),
                _ => None,
            })
            .collect()
    }

    async fn start_vm(&self, cfg: &VmConfig) -> Result<VmHandle, VmmError> {
        self.lock().calls.push(FakeCall::Start(cfg.clone()));
        self.boot(cfg).await
    }

    /// What a start and a restore share: the hold, the refusals, a new "process".
    async fn boot(&self, cfg: &VmConfig) -> Result<VmHandle, VmmError> {
        // The sender lives as long as `self`, so this only ends when the hold is lifted.
        let _ = self.hold.subscribe().wait_for(|held| !*held).await;
        let mut inner = self.lock();
        check_inputs(cfg)?;
        if let Some(error) = inner.next_start_error.take() {
            return Err(error);
        }
        if std::mem::take(&mut inner.refuse_next_start) {
            return Err(VmmError::ExitedDuringStart {
                vm: cfg.name.clone(),
                backend: self.kind,
                status: "exit status 1".to_string(),
                logs: String::new(),
            });
        }
        let pid = inner.next_pid;
        inner.next_pid += 1;
        let mut process = Process {
            name: cfg.name.clone(),
            shape: shape_of(self.kind, cfg),
            run_dir: cfg.run_dir.clone(),
            pid,
            start_time: u64::MAX - pid.unsigned_abs() as u64,
            ended: None,
            guest_ends: Vec::new(),
        };
        if inner.die_after_start {
            process.end("exit status 1");
        }
        let handle = VmHandle {
            name: cfg.name.clone(),
            backend: self.kind,
            pid,
            pid_start_time: process.start_time,
            agent: AgentEndpoint::VirtioSerial {
                socket: cfg.run_dir.join("agent.sock"),
            },
            api_socket: None,
            run_dir: cfg.run_dir.clone(),
        };
        inner.processes.push(process);
        Ok(handle)
    }

    /// Records the snapshot; writes a small state file and the manifest of the VM's shape
    /// around the caller's `while_paused`, as a real backend does, and removes them again when
    /// that fails.
    async fn snapshot_vm(
        &self,
        handle: &VmHandle,
        dest: &SnapshotPaths,
        while_paused: WhilePaused<'_>,
    ) -> Result<SnapshotInfo, VmmError> {
        let vm = handle.name.as_str();
        let shape = {
            let mut inner = self.lock();
            inner.calls.push(FakeCall::Snapshot {
                vm: vm.to_string(),
                dest: dest.dir().to_path_buf(),
            });
            inner
                .processes
                .iter()
                .find(|p| {
                    p.pid == handle.pid
                        && p.start_time == handle.pid_start_time
                        && p.ended.is_none()
                })
                .map(|p| p.shape.clone())
        };
        let Some(shape) = shape else {
            return Err(VmmError::SaveState {
                vm: vm.to_string(),
                path: dest.state(),
                reason: "the VMM is not running".into(),
            });
        };
        crate::snapshot::require_fresh(dest, vm)?;
        let paused_at = std::time::Instant::now();
        let saved = async {
            fs_err::write(dest.state(), FAKE_STATE).map_err(|source| VmmError::Io {
                vm: vm.to_string(),
                action: format!("cannot write the state file {}", dest.state().display()),
                source,
            })?;
            crate::snapshot::after_save(vm, dest, &[dest.state()], shape, paused_at, while_paused)
                .await
        }
        .await;
        crate::snapshot::conclude(vm, dest, saved, Ok(()), paused_at)
    }

    /// Records the restore, refuses a snapshot of another shape as the real backends do, then
    /// behaves like a start (holds, refusals and all).
    async fn restore_vm(
        &self,
        cfg: &VmConfig,
        snapshot: &SnapshotPaths,
    ) -> Result<VmHandle, VmmError> {
        self.lock().calls.push(FakeCall::Restore {
            cfg: cfg.clone(),
            snapshot: snapshot.dir().to_path_buf(),
        });
        check_inputs(cfg)?;
        let manifest = Manifest::read(snapshot, &cfg.name)?;
        manifest
            .shape
            .require_equal(&shape_of(self.kind, cfg), &cfg.name, &snapshot.manifest())?;
        self.boot(cfg).await
    }

    /// How the handle's process ended; `None` while it runs. A handle the fake never issued is
    /// a process that is long gone.
    fn ended(&self, handle: &VmHandle) -> Option<&'static str> {
        self.lock()
            .processes
            .iter()
            .find(|p| p.pid == handle.pid && p.start_time == handle.pid_start_time)
            .map_or(Some("exit status unknown"), |p| p.ended)
    }

    /// Ends the handle's process as a stop does; false when it survives even that.
    fn end_by_stop(&self, handle: &VmHandle, how: &'static str) -> bool {
        let mut inner = self.lock();
        if how == "killed by SIGKILL" && inner.survive_kill {
            return false;
        }
        if let Some(p) = inner
            .processes
            .iter_mut()
            .find(|p| p.pid == handle.pid && p.start_time == handle.pid_start_time)
        {
            p.end(how);
        }
        true
    }

    async fn stop_vm(&self, handle: &VmHandle, graceful: Duration) -> Result<(), VmmError> {
        let record = |forced| {
            self.lock().calls.push(FakeCall::Stop {
                vm: handle.name.clone(),
                graceful,
                forced,
            })
        };
        if self.ended(handle).is_some() {
            record(false);
            return Ok(());
        }
        // A guest shuts down when asked, if it is given any time for it at all.
        let ignored = self.lock().ignore_shutdown;
        if !ignored && !graceful.is_zero() {
            self.end_by_stop(handle, "exit status 0");
            record(false);
            return Ok(());
        }
        // The grace period runs out (at once, when there is none), then the kill.
        tokio::time::sleep(graceful).await;
        record(true);
        if self.end_by_stop(handle, "killed by SIGKILL") {
            Ok(())
        } else {
            Err(VmmError::StillRunning {
                vm: handle.name.clone(),
                pid: handle.pid,
                waited: graceful,
            })
        }
    }

    fn connect(&self, handle: &VmHandle) -> Result<AgentStream, VmmError> {
        let refused = |why: &str| VmmError::AgentConnect {
            endpoint: handle.agent.to_string(),
            source: io::Error::new(io::ErrorKind::ConnectionRefused, why.to_string()),
        };
        let fail = |source| VmmError::AgentConnect {
            endpoint: handle.agent.to_string(),
            source,
        };
        let mut inner = self.lock();
        let agent = inner.agent.clone();
        let Some(process) = inner
            .processes
            .iter_mut()
            .find(|p| p.pid == handle.pid && p.start_time == handle.pid_start_time)
            .filter(|p| p.ended.is_none())
        else {
            return Err(refused("the VMM is not running"));
        };
        let Some(agent) = agent else {
            return Err(refused("no agent answers in this fake guest"));
        };
        let (host, guest) = StdUnixStream::pair().map_err(fail)?;
        process.guest_ends.push(guest.try_clone().map_err(fail)?);
        drop(inner);
        agent(&handle.name, guest);
        host.set_nonblocking(true).map_err(fail)?;
        let host = tokio::net::UnixStream::from_std(host).map_err(fail)?;
        Ok(AgentStream::Unix(host))
    }
}

/// What the fake's state file holds.
const FAKE_STATE: &[u8] = b"banger fake VMM state\n";

/// The shape a fake VM of `cfg` has.
fn shape_of(kind: BackendKind, cfg: &VmConfig) -> Shape {
    Shape {
        backend: kind,
        vcpus: cfg.vcpus,
        memory_mib: cfg.memory_mib,
        network: cfg.net.is_some(),
        layout: "fake".to_string(),
    }
}

impl Vmm for FakeVmm {
    fn kind(&self) -> BackendKind {
        self.kind
    }

    fn start<'a>(&'a self, cfg: &'a VmConfig) -> BoxFuture<'a, Result<VmHandle, VmmError>> {
        Box::pin(self.start_vm(cfg))
    }

    fn stop<'a>(
        &'a self,
        handle: &'a VmHandle,
        graceful: Duration,
    ) -> BoxFuture<'a, Result<(), VmmError>> {
        Box::pin(self.stop_vm(handle, graceful))
    }

    fn snapshot<'a>(
        &'a self,
        handle: &'a VmHandle,
        dest: &'a SnapshotPaths,
        while_paused: WhilePaused<'a>,
    ) -> BoxFuture<'a, Result<SnapshotInfo, VmmError>> {
        Box::pin(self.snapshot_vm(handle, dest, while_paused))
    }

    fn restore<'a>(
        &'a self,
        cfg: &'a VmConfig,
        snapshot: &'a SnapshotPaths,
    ) -> BoxFuture<'a, Result<VmHandle, VmmError>> {
        Box::pin(self.restore_vm(cfg, snapshot))
    }

    /// A running VMM started for `vm` in `run_dir`.
    fn leftover(&self, vm: &str, run_dir: &Path) -> Option<VmHandle> {
        let inner = self.lock();
        let p = inner
            .processes
            .iter()
            .find(|p| p.name == vm && p.run_dir == run_dir && p.ended.is_none())?;
        Some(VmHandle {
            name: vm.to_string(),
            backend: self.kind,
            pid: p.pid,
            pid_start_time: p.start_time,
            agent: AgentEndpoint::VirtioSerial {
                socket: run_dir.join("agent.sock"),
            },
            api_socket: None,
            run_dir: run_dir.to_path_buf(),
        })
    }

    fn is_alive(&self, handle: &VmHandle) -> bool {
        self.ended(handle).is_none()
    }

    fn wait_for_exit<'a>(&'a self, handle: &'a VmHandle) -> BoxFuture<'a, String> {
        Box::pin(async move {
            loop {
                if let Some(how) = self.ended(handle) {
                    return how.to_string();
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        })
    }

    fn connect_agent<'a>(
        &'a self,
        handle: &'a VmHandle,
    ) -> BoxFuture<'a, Result<AgentStream, VmmError>> {
        Box::pin(async move { self.connect(handle) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn config(dir: &std::path::Path, name: &str) -> VmConfig {
        for f in ["vmlinuz", "root.ext4", "work.ext4"] {
            std::fs::write(dir.join(f), "").unwrap();
        }
        VmConfig {
            name: name.into(),
            vcpus: 1,
            memory_mib: 128,
            kernel: dir.join("vmlinuz"),
            initrd: None,
            kernel_args: "console=ttyS0".into(),
            root_disk: dir.join("root.ext4"),
            work_disk: dir.join("work.ext4"),
            net: None,
            vsock_cid: None,
            run_dir: dir.to_path_buf(),
            console_log: dir.join("console.log"),
        }
    }

    #[tokio::test]
    async fn starts_and_stops_are_recorded_and_a_refused_start_leaves_nothing_running() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeVmm::new();
        fake.refuse_next_start();
        let err = fake.start(&config(dir.path(), "a")).await.unwrap_err();
        assert!(err.to_string().contains("exited during start-up"), "{err}");
        assert!(fake.running().is_empty());
        let h = fake.start(&config(dir.path(), "a")).await.unwrap();
        assert!(fake.is_alive(&h));
        fake.stop(&h, Duration::from_secs(30)).await.unwrap();
        assert!(!fake.is_alive(&h));
        assert_eq!(fake.wait_for_exit(&h).await, "exit status 0");
        assert_eq!(fake.starts().len(), 2);
        assert_eq!(
            fake.calls().last(),
            Some(&FakeCall::Stop {
                vm: "a".into(),
                graceful: Duration::from_secs(30),
                forced: false
            })
        );
    }

    #[tokio::test]
    async fn snapshots_are_recorded_and_a_restore_behaves_like_a_start_of_the_same_shape() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("snap");
        std::fs::create_dir(&snap).unwrap();
        let paths = SnapshotPaths::new(&snap);
        let fake = FakeVmm::new();
        let h = fake.start(&config(dir.path(), "a")).await.unwrap();

        let copied = Arc::new(Mutex::new(false));
        let c = copied.clone();
        let info = fake
            .snapshot(
                &h,
                &paths,
                Box::pin(async move {
                    *c.lock().unwrap() = true;
                    Ok(())
                }),
            )
            .await
            .unwrap();
        assert!(*copied.lock().unwrap(), "the work while paused did not run");
        assert_eq!(info.state_bytes, FAKE_STATE.len() as u64);
        assert!(fake.is_alive(&h), "the snapshot stopped the VM");
        assert_eq!(Manifest::read(&paths, "b").unwrap().shape.memory_mib, 128);

        let mut wide = config(dir.path(), "b");
        wide.vcpus = 4;
        let err = fake.restore(&wide, &paths).await.unwrap_err();
        assert!(matches!(err, VmmError::SnapshotMismatch { .. }), "{err}");
        let h2 = fake
            .restore(&config(dir.path(), "b"), &paths)
            .await
            .unwrap();
        assert!(fake.is_alive(&h2));
        assert_eq!(fake.running(), ["a", "b"]);
        let kinds: Vec<_> = fake
            .calls()
            .into_iter()
            .map(|c| match c {
                FakeCall::Start(cfg) => format!("start {}", cfg.name),
                FakeCall::Snapshot { vm, .. } => format!("snapshot {vm}"),
                FakeCall::Restore { cfg, .. } => format!("restore {}", cfg.name),
                FakeCall::Stop { vm, .. } => format!("stop {vm}"),
            })
            .collect();
        assert_eq!(kinds, ["start a", "snapshot a", "restore b", "restore b"]);

        // A failing step while paused leaves nothing behind; a second snapshot into the same
        // directory is refused.
        let err = fake
            .snapshot(&h, &paths, Box::pin(async { Ok(()) }))
            .await
            .unwrap_err();
        assert!(
            err.report().contains("a snapshot is already there"),
            "{}",
            err.report()
        );
        let other = SnapshotPaths::new(dir.path());
        let err = fake
            .snapshot(&h, &other, Box::pin(async { Err("disk full".into()) }))
            .await
            .unwrap_err();
        assert!(
            err.report().ends_with("failed: disk full"),
            "{}",
            err.report()
        );
        assert!(!other.state().exists() && !other.manifest().exists());
    }

    #[tokio::test]
    async fn a_guest_that_ignores_shutdown_is_killed_after_the_grace_period() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeVmm::new();
        fake.ignore_shutdown(true);
        let h = fake.start(&config(dir.path(), "a")).await.unwrap();
        fake.power_off("a");
        assert!(fake.is_alive(&h), "the guest was to ignore the power-off");
        let t = std::time::Instant::now();
        fake.stop(&h, Duration::from_millis(100)).await.unwrap();
        assert!(t.elapsed() >= Duration::from_millis(100));
        assert_eq!(fake.wait_for_exit(&h).await, "killed by SIGKILL");
        fake.survive_kill(true);
        let h = fake.start(&config(dir.path(), "b")).await.unwrap();
        let err = fake.stop(&h, Duration::ZERO).await.unwrap_err();
        assert!(matches!(err, VmmError::StillRunning { .. }), "{err}");
    }

    #[tokio::test]
    async fn a_held_start_is_recorded_and_waits_until_released() {
        let dir = tempfile::tempdir().unwrap();
        let fake = Arc::new(FakeVmm::new());
        fake.hold_starts(true);
        let cfg = config(dir.path(), "a");
        let f = fake.clone();
        let start = tokio::spawn(async move { f.start(&cfg).await.map(|h| h.name) });
        while fake.starts().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!start.is_finished(), "the start did not wait");
        assert!(fake.running().is_empty());
        fake.hold_starts(false);
        assert_eq!(start.await.unwrap().unwrap(), "a");
        assert_eq!(fake.running(), ["a"]);
    }

    #[tokio::test]
    async fn the_agent_channel_is_a_socket_pair_that_a_crash_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let fake = FakeVmm::new();
        let h = fake.start(&config(dir.path(), "a")).await.unwrap();
        assert!(
            fake.connect_agent(&h).await.is_err(),
            "nobody plays the agent"
        );
        fake.serve_agent(Arc::new(|vm: &str, mut guest: StdUnixStream| {
            use std::io::Write;
            let _ = guest.write_all(vm.as_bytes());
        }));
        let AgentStream::Unix(mut host) = fake.connect_agent(&h).await.unwrap() else {
            panic!("not a Unix stream")
        };
        let mut hello = [0u8; 1];
        host.read_exact(&mut hello).await.unwrap();
        assert_eq!(&hello, b"a");
        assert!(fake.crash("a"));
        let mut rest = Vec::new();
        host.read_to_end(&mut rest).await.unwrap();
        assert!(host.write_all(b"x").await.is_err() || rest.is_empty());
        assert!(
            fake.connect_agent(&h).await.is_err(),
            "a dead VMM has no agent"
        );
        fake.die_after_start(true);
        let h = fake.start(&config(dir.path(), "b")).await.unwrap();
        assert!(!fake.is_alive(&h));
    }
}
