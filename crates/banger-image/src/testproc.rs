//! Test helpers for tests with real processes and mounts: whether a process still runs, waiting
//! for processes to end, and guards that kill a test's processes and unmount its mounts even
//! when the test fails half-way.

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
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(s) = std::fs::read_to_string(file) {
            return s.split_whitespace().map(|p| p.parse().unwrap()).collect();
        }
        assert!(Instant::now() < deadline, "the stand-in never started");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kills the processes a test saw start, when dropped.
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
