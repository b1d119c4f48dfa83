//! Test helpers for tests with real processes and mounts: whether a process still runs, waiting
//! for processes to end, guards that kill a test's processes and unmount its mounts even when
//! the test fails half-way, and a stand-in debootstrap run by the real privileged runner.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test helpers: a panic is a failure

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A process that exists and is not a zombie (an orphan's reaper may take its time).
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            let state = s.rsplit_once(") ")?.1.chars().next()?;
            Some(state != 'Z' && state != 'X')
        })
        .unwrap_or(false)
}

/// Waits until none of `pids` runs; fails the test after `limit`.
pub async fn gone_within(pids: &[i32], limit: Duration) {
    let deadline = Instant::now() + limit;
    while pids.iter().any(|&p| alive(p)) {
        assert!(
            Instant::now() < deadline,
            "still running after {limit:?}: {:?}",
            pids.iter().filter(|&&p| alive(p)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The whitespace-separated pids a stand-in wrote (atomically, by rename) into `file`.
pub async fn pids_in(file: &Path) -> Vec<i32> {
    // Generous: a build behind an HTTP request on a loaded host takes a while to get there.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(s) = std::fs::read_to_string(file) {
            return s.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
        assert!(Instant::now() < deadline, "the stand-in never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the processes a test saw start, when dropped.
#[derive(Default)]
pub struct Reaper(Mutex<Vec<i32>>);

impl Reaper {
    pub fn new() -> Self {
        Self(Mutex::new(Vec::new()))
    }

    pub fn add(&self, pids: &[i32]) {
        self.0.lock().unwrap().extend_from_slice(pids);
    }
}

impl Drop for Reaper {
    fn drop(&mut self) {
        for &pid in self.0.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            if alive(pid) {
                // SAFETY: kill(2) has no memory effects; the pid is one this test saw start.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Lazily unmounts everything at or below a directory and removes it, when dropped.
pub struct MountGuard(pub PathBuf);

impl Drop for MountGuard {
    fn drop(&mut self) {
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in crate::workdir::mounts_under(&info, &self.0) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(&point)
                .status();
        }
        let _ = std::process::Command::new("rm")
            .args(["-rf", "--one-file-system", "--"])
            .arg(&self.0)
            .status();
    }
}

/// Whether anything is mounted at or below `dir` (canonical).
pub fn mounted_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    crate::workdir::mounts_under(&info, dir)
}

/// `mount ARGS TARGET`, which must succeed.
pub fn mount(args: &[&str], target: &Path) {
    let ok = std::process::Command::new("mount")
        .args(args)
        .arg(target)
        .status()
        .unwrap()
        .success();
    assert!(ok, "mount {args:?} {}", target.display());
}

/// Writes, in `dir`, a stand-in for debootstrap that does what makes a real one hard to stop:
/// writes root-owned files into the tree (its 6th argument), mounts a /proc there, starts a
/// child, records both pids in `pids` (by rename, for [`pids_in`]), says `I: Retrieving
/// InRelease`, and waits.
pub fn debootstrap_script(dir: &Path, pids: &Path) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let script = dir.join("debootstrap");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\ntree=$6\nmkdir -p \"$tree/proc\" \"$tree/etc\"\n\
             echo x > \"$tree/etc/passwd\"\nmount -t tmpfs banger-test \"$tree/proc\"\n\
             sleep 1000 &\necho $$ $! > {p}.new\nmv {p}.new {p}\n\
             echo 'I: Retrieving InRelease'\nwait\n",
            p = pids.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    script
}

/// The real privileged runner, with debootstrap replaced by `debootstrap` (a stand-in).
pub struct StandIn {
    pub host: crate::privileged::HostPrivileged,
    pub debootstrap: PathBuf,
}

impl crate::Privileged for StandIn {
    fn run_until<'a>(
        &'a self,
        cmd: &'a crate::PrivCommand,
        progress: &'a dyn crate::Progress,
        cancel: &'a tokio_util::sync::CancellationToken,
    ) -> futures_util::future::BoxFuture<'a, Result<crate::privileged::PrivOutput, crate::PrivError>>
    {
        Box::pin(async move {
            if cmd.op == "debootstrap" {
                let mut c = cmd.clone();
                c.program = self.debootstrap.clone();
                self.host.run_until(&c, progress, cancel).await
            } else {
                self.host.run_until(cmd, progress, cancel).await
            }
        })
    }

    fn file_owner(&self) -> (u32, u32) {
        self.host.file_owner()
    }
}
