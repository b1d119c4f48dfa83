//! A guest's console log, kept to a bounded size: `console.log` and one older file,
//! `console.log.1`, each about [`CAP`] at most.
//!
//! The VMM writes the guest's serial console straight into `console.log`, and the VMM outlives
//! the daemon: nothing may stand between the guest and the file that would block or end the guest
//! while no daemon runs. So the daemon rotates the file from the side instead. While it supervises
//! a running VM it checks the size ([`keep_capped`]); past [`CAP`] it copies the file to
//! `console.log.1` (replacing the older one) and truncates `console.log` to nothing. Both VMMs
//! hold the file open with `O_APPEND` (QEMU's `-chardev file,append=on`, and Firecracker's stdout
//! as banger-vmm opens it), so their next write lands at the new end, offset 0, rather than at
//! the old offset behind a hole the size of the old file.
//!
//! What this gives up: what the guest writes in the instant between the copy reaching the end of
//! the file and the truncation, and the bound while no daemon runs (the log grows until the next
//! daemon re-adopts the VM and rotates it at once, keeping only its last [`CAP`]).
//!
//! Readers never take a whole log into memory: `vm logs` streams `console.log.1` then
//! `console.log` in chunks through a [`ConsoleReader`], which follows rotations and new boots,
//! and error messages quote the end through `banger_config::logtail`.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;

/// Size at which `console.log` is rotated: the guest's console keeps at most about twice this.
pub const CAP: u64 = 8 << 20;

/// One rotation at a time in this daemon: a restarted VM's watcher may briefly overlap the
/// previous run's, and two rotations of one file at once would each truncate what the other
/// copied.
static ROTATING: Mutex<()> = Mutex::new(());

/// A VM's console log and the size it is kept under.
#[derive(Debug, Clone)]
pub struct ConsoleLog {
    path: PathBuf,
    cap: u64,
}

/// The older file of the console log at `log`: `console.log.1`.
pub fn older_path(log: &Path) -> PathBuf {
    let mut s = log.as_os_str().to_owned();
    s.push(".1");
    PathBuf::from(s)
}

impl ConsoleLog {
    /// The console log at `path`, rotated at [`CAP`].
    pub fn new(path: PathBuf) -> ConsoleLog {
        ConsoleLog::with_cap(path, CAP)
    }

    /// The console log at `path`, rotated at `cap` bytes (tests use small ones).
    pub fn with_cap(path: PathBuf, cap: u64) -> ConsoleLog {
        ConsoleLog { path, cap }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// `console.log.1`.
    pub fn older(&self) -> PathBuf {
        older_path(&self.path)
    }

    /// Begins a boot's log: a new, empty `console.log` and no older file, so both are about
    /// this boot. A new file rather than the old one emptied: a reader still on the previous
    /// boot's log sees by the file's identity that a new one began.
    pub fn start_fresh(&self) -> anyhow::Result<()> {
        for old in [self.older(), self.path.clone()] {
            match std::fs::remove_file(&old) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    return Err(e).with_context(|| format!("cannot remove {}", old.display()))
                }
            }
        }
        std::fs::write(&self.path, b"")
            .with_context(|| format!("cannot create {}", self.path.display()))
    }

    /// Rotates the log when it has reached its cap: its content goes to `console.log.1`
    /// (replacing that) and `console.log` is truncated to nothing. True when it rotated. Blocking.
    ///
    /// The copy is streamed (`std::io::copy`, which the kernel does with `copy_file_range`), never
    /// held in memory. A log just over the cap is kept whole; one far past it (it grew while no
    /// daemon watched) keeps only its last `cap` bytes.
    pub fn rotate_if_full(&self) -> anyhow::Result<bool> {
        let _one = ROTATING.lock().unwrap_or_else(|p| p.into_inner());
        let path = &self.path;
        let mut log = match OpenOptions::new().read(true).write(true).open(path) {
            Ok(f) => f,
            // No log yet (or the VM was just deleted): nothing to keep small.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(e).with_context(|| format!("cannot open {}", path.display())),
        };
        let len = log
            .metadata()
            .with_context(|| format!("cannot read the size of {}", path.display()))?
            .len();
        if len < self.cap {
            return Ok(false);
        }
        let start = if len > self.cap.saturating_mul(2) {
            len - self.cap
        } else {
            0
        };
        log.seek(SeekFrom::Start(start))
            .with_context(|| format!("cannot read {}", path.display()))?;
        let dir = path
            .parent()
            .with_context(|| format!("{} has no directory", path.display()))?;
        let older = self.older();
        // A temporary file renamed over the older one: a reader of `console.log.1` sees the
        // previous one or the new one, never half of it.
        let mut staged = tempfile::Builder::new()
            .prefix(".console.log.1.")
            .tempfile_in(dir)
            .with_context(|| format!("cannot create a temporary file in {}", dir.display()))?;
        // Up to the end of the file, including what arrived since `len` was read, but bounded:
        // a guest writing faster than the copy must not keep it going.
        let limit = (len - start).saturating_add(self.cap);
        std::io::copy(&mut (&mut log).take(limit), staged.as_file_mut())
            .with_context(|| format!("cannot copy {} to {}", path.display(), older.display()))?;
        staged
            .persist(&older)
            .with_context(|| format!("cannot move the old console log to {}", older.display()))?;
        log.set_len(0)
            .with_context(|| format!("cannot truncate {}", path.display()))?;
        Ok(true)
    }
}

/// Keeps `log` under its cap, checking at once and then every `every`, for as long as the
/// future runs: the VM's supervision aborts it when the VM's run ends, and a daemon that dies
/// takes it along (the guest goes on writing; the next daemon's check rotates the log).
pub async fn keep_capped(log: ConsoleLog, every: Duration) {
    // A failure (a full disk, say) is logged when it first happens, not at every check.
    let mut failing: Option<String> = None;
    loop {
        let l = log.clone();
        match tokio::task::spawn_blocking(move || l.rotate_if_full()).await {
            Ok(Ok(rotated)) => {
                if rotated {
                    tracing::debug!(log = %log.path.display(), "rotated the console log");
                }
                failing = None;
            }
            Ok(Err(e)) => {
                let msg = format!("{e:#}");
                if failing.as_deref() != Some(msg.as_str()) {
                    tracing::warn!("cannot keep the console log small: {msg}");
                }
                failing = Some(msg);
            }
            // The runtime is shutting down.
            Err(_) => return,
        }
        tokio::time::sleep(every).await;
    }
}

/// Reads a console log as `vm logs` shows it: `console.log.1`, then `console.log`, in chunks of
/// at most [`CHUNK`]; asked again after reaching the end, it goes on with what was written since.
/// A rotation is followed: what was written after the last read and before the rotation ends
/// `console.log.1` and comes first. A new boot (a new `console.log`, no older file) is read from
/// its start. A reader that falls more than one rotation behind skips what it missed.
pub struct ConsoleReader {
    path: PathBuf,
    older_path: PathBuf,
    /// Read to its end before `file`: the whole older file, or after a rotation its unsent part.
    older: Option<tokio::fs::File>,
    file: Option<tokio::fs::File>,
    /// How far into `console.log` this reader is.
    pos: u64,
}

/// The most a reader takes from a log at a time.
pub const CHUNK: usize = 64 * 1024;

impl ConsoleReader {
    /// A reader at the start of the older file. A missing file is an empty one (the VM has
    /// not booted yet).
    pub async fn open(path: PathBuf) -> anyhow::Result<ConsoleReader> {
        let older_path = older_path(&path);
        Ok(ConsoleReader {
            older: open_if_there(&older_path).await?,
            file: open_if_there(&path).await?,
            path,
            older_path,
            pos: 0,
        })
    }

    /// The next chunk, or `None` at the end of what is written so far.
    pub async fn next_chunk(&mut self) -> Option<bytes::Bytes> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        loop {
            if let Some(o) = self.older.as_mut() {
                let mut buf = vec![0u8; CHUNK];
                if let Ok(n @ 1..) = o.read(&mut buf).await {
                    buf.truncate(n);
                    return Some(buf.into());
                }
                self.older = None;
            }
            if self.file.is_some() && self.new_boot().await {
                self.file = None;
                self.older = None;
                self.pos = 0;
            }
            if self.file.is_none() {
                self.file = tokio::fs::File::open(&self.path).await.ok();
            }
            let f = self.file.as_mut()?;
            let len = f.metadata().await.map(|m| m.len()).unwrap_or(0);
            if len < self.pos {
                // Rotated, or a new boot began the log again: go on from its start, after the
                // part of the older file written since the last read (a new boot removed it).
                if let Ok(mut o) = tokio::fs::File::open(&self.older_path).await {
                    let older_len = o.metadata().await.map(|m| m.len()).unwrap_or(0);
                    if older_len >= self.pos && o.seek(SeekFrom::Start(self.pos)).await.is_ok() {
                        self.older = Some(o);
                    }
                }
                self.pos = 0;
                continue;
            }
            f.seek(SeekFrom::Start(self.pos)).await.ok()?;
            let mut buf = vec![0u8; CHUNK];
            let n = f.read(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            self.pos += n as u64;
            buf.truncate(n);
            return Some(buf.into());
        }
    }
}

impl ConsoleReader {
    /// Whether `console.log` is another file than the one this reader has open: a new boot
    /// began (a log that is gone, with its VM, is read to its end).
    async fn new_boot(&self) -> bool {
        use std::os::unix::fs::MetadataExt;
        let Some(f) = self.file.as_ref() else {
            return false;
        };
        match (f.metadata().await, tokio::fs::metadata(&self.path).await) {
            (Ok(open), Ok(now)) => (open.dev(), open.ino()) != (now.dev(), now.ino()),
            _ => false,
        }
    }
}

async fn open_if_there(path: &Path) -> anyhow::Result<Option<tokio::fs::File>> {
    match tokio::fs::File::open(path).await {
        Ok(f) => Ok(Some(f)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("cannot read {}", path.display())),
    }
}

/// Aborts a task when dropped: a watcher that ends with the task that started it.
pub struct AbortOnDrop(pub tokio::task::AbortHandle);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::fs::File;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    /// Whether `file` starts with `n` bytes of zeros: the hole a writer without `O_APPEND`
    /// leaves behind a truncation.
    fn starts_with_zeros(file: &Path, n: usize) -> bool {
        let mut buf = vec![0xffu8; n];
        File::open(file)
            .and_then(|mut f| f.read_exact(&mut buf))
            .is_ok_and(|()| buf.iter().all(|&b| b == 0))
    }

    fn appender(path: &Path) -> File {
        OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap()
    }

    fn files_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_log_under_its_cap_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 100);
        assert!(!log.rotate_if_full().unwrap(), "no log yet");
        std::fs::write(log.path(), [b'a'; 99]).unwrap();
        assert!(!log.rotate_if_full().unwrap());
        assert_eq!(std::fs::read(log.path()).unwrap(), [b'a'; 99]);
        assert_eq!(files_in(dir.path()), ["console.log"]);
    }

    #[test]
    fn at_its_cap_the_log_moves_to_the_older_file_and_starts_empty() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 100);
        let mut vmm = appender(log.path());
        vmm.write_all(&[b'a'; 100]).unwrap();
        assert!(log.rotate_if_full().unwrap());
        assert_eq!(std::fs::read(log.older()).unwrap(), [b'a'; 100]);
        assert_eq!(std::fs::metadata(log.path()).unwrap().len(), 0);

        // The VMM's descriptor has O_APPEND: its next write lands at the new start, no hole.
        vmm.write_all(b"after\n").unwrap();
        assert_eq!(std::fs::read(log.path()).unwrap(), b"after\n");
    }

    #[test]
    fn only_two_files_are_kept_and_the_older_is_the_previous_one() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 10);
        let mut vmm = appender(log.path());
        for round in [b'1', b'2', b'3'] {
            vmm.write_all(&[round; 12]).unwrap();
            assert!(log.rotate_if_full().unwrap());
        }
        vmm.write_all(b"now").unwrap();
        assert_eq!(std::fs::read(log.older()).unwrap(), [b'3'; 12]);
        assert_eq!(std::fs::read(log.path()).unwrap(), b"now");
        assert_eq!(files_in(dir.path()), ["console.log", "console.log.1"]);
    }

    #[test]
    fn a_log_far_past_its_cap_keeps_only_its_end_and_is_not_read_whole() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 1 << 20);
        // A 4 GiB log (sparse) that grew while no daemon watched, with text at its end.
        let f = File::create(log.path()).unwrap();
        f.set_len(4 << 30).unwrap();
        drop(f);
        appender(log.path()).write_all(b"\nthe end\n").unwrap();
        let t = std::time::Instant::now();
        assert!(log.rotate_if_full().unwrap());
        assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
        let older = std::fs::metadata(log.older()).unwrap().len();
        assert_eq!(older, 1 << 20, "only the last cap of the log is kept");
        let kept = banger_config::logtail::tail(&log.older(), 1);
        assert_eq!(kept, "the end");
        assert_eq!(std::fs::metadata(log.path()).unwrap().len(), 0);
    }

    #[test]
    fn a_fresh_start_empties_the_log_and_drops_the_older_file() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 10);
        std::fs::write(log.path(), b"previous boot, long enough").unwrap();
        assert!(log.rotate_if_full().unwrap());
        std::fs::write(log.path(), b"more").unwrap();
        log.start_fresh().unwrap();
        assert_eq!(std::fs::read(log.path()).unwrap(), b"");
        assert_eq!(files_in(dir.path()), ["console.log"]);
        // Also when there was nothing to drop.
        log.start_fresh().unwrap();
    }

    #[test]
    fn a_writer_without_o_append_would_leave_a_hole_which_is_why_both_vmms_append() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 10);
        let mut positioned = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(false)
            .open(log.path())
            .unwrap();
        positioned.write_all(&[b'x'; 20]).unwrap();
        assert!(log.rotate_if_full().unwrap());
        positioned.write_all(b"next").unwrap();
        assert!(starts_with_zeros(log.path(), 20));
    }

    /// A guest that floods its console through an `O_APPEND` descriptor, as the VMMs hold it,
    /// while the watcher runs: the log stays within its cap plus what arrives between two checks,
    /// exactly two files exist, and they hold the guest's output in order (at most the line being
    /// written at a rotation lost, never a hole).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_watcher_keeps_a_flooded_log_within_its_cap() {
        const CAP_BYTES: u64 = 1 << 20;
        const EVERY: Duration = Duration::from_millis(10);
        const LINE: &str = " the guest floods its console\n";
        let line_len = 12 + LINE.len() as u64;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let log = ConsoleLog::with_cap(path.clone(), CAP_BYTES);
        let watcher = tokio::spawn(keep_capped(log.clone(), EVERY));

        let stop = Arc::new(AtomicBool::new(false));
        let lines = Arc::new(AtomicU64::new(0));
        let largest = Arc::new(AtomicU64::new(0));
        let writer = {
            let (stop, lines, largest) = (stop.clone(), lines.clone(), largest.clone());
            let path = path.clone();
            std::thread::spawn(move || {
                let mut f = appender(&path);
                // Bursts of 64 lines a millisecond apart: a few MB/s, some 30 KiB per check.
                while !stop.load(Ordering::SeqCst) {
                    for _ in 0..64 {
                        let n = lines.fetch_add(1, Ordering::SeqCst) + 1;
                        f.write_all(format!("{n:>12}{LINE}").as_bytes()).unwrap();
                    }
                    let len = std::fs::metadata(&path).unwrap().len();
                    largest.fetch_max(len, Ordering::SeqCst);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        // Until the guest has written four times the cap: three rotations or more.
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while lines.load(Ordering::SeqCst) * line_len < 4 * CAP_BYTES {
            assert!(std::time::Instant::now() < deadline, "the writer is stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.store(true, Ordering::SeqCst);
        writer.join().unwrap();
        let last = lines.load(Ordering::SeqCst);
        watcher.abort();
        // A rotation already under way finishes; wait for it before reading.
        tokio::time::sleep(Duration::from_millis(100)).await;
        drop(ROTATING.lock().unwrap());

        // The slack over the cap allows for a loaded machine delaying a check (by 200 ms or so).
        let largest = largest.load(Ordering::SeqCst);
        assert!(largest < 2 * CAP_BYTES, "the log reached {largest} bytes");
        assert_eq!(files_in(dir.path()), ["console.log", "console.log.1"]);

        let numbers = |p: &Path| -> Vec<u64> {
            let text = String::from_utf8(std::fs::read(p).unwrap()).unwrap();
            assert!(!text.contains('\0'), "a hole in {}", p.display());
            // A copy may end inside the line the guest was writing at that instant.
            text.lines()
                .filter(|l| l.ends_with("console"))
                .map(|l| l.split_whitespace().next().unwrap().parse().unwrap())
                .collect()
        };
        let (older, current) = (numbers(&log.older()), numbers(log.path()));
        for run in [&older, &current] {
            assert!(
                run.windows(2).all(|w| w[1] == w[0] + 1),
                "lines out of order or missing within a file"
            );
        }
        let newest = current.last().or(older.last());
        assert_eq!(newest, Some(&last), "the newest line is kept");
        if let (Some(o), Some(c)) = (older.last(), current.first()) {
            assert!(o < c, "console.log.1 is older than console.log");
        }
    }

    async fn read_all(reader: &mut ConsoleReader) -> String {
        let mut out = Vec::new();
        while let Some(chunk) = reader.next_chunk().await {
            assert!(chunk.len() <= CHUNK);
            out.extend_from_slice(&chunk);
        }
        String::from_utf8(out).unwrap()
    }

    #[tokio::test]
    async fn the_reader_shows_the_older_file_first_and_follows_a_rotation() {
        let dir = tempfile::tempdir().unwrap();
        let log = ConsoleLog::with_cap(dir.path().join("console.log"), 10);
        let mut reader = ConsoleReader::open(log.path().to_owned()).await.unwrap();
        assert_eq!(read_all(&mut reader).await, "", "not booted yet");

        let mut vmm = appender(log.path());
        vmm.write_all(b"boot 1\nfirst\n").unwrap();
        assert_eq!(read_all(&mut reader).await, "boot 1\nfirst\n");
        // More arrives, then the log is rotated before the reader comes back: what it had not
        // read yet is at the end of the older file, and comes before the new log.
        vmm.write_all(b"second\n").unwrap();
        assert!(log.rotate_if_full().unwrap());
        vmm.write_all(b"third\n").unwrap();
        assert_eq!(read_all(&mut reader).await, "second\nthird\n");

        // A reader opened now gets both files, oldest first.
        let mut fresh = ConsoleReader::open(log.path().to_owned()).await.unwrap();
        assert_eq!(read_all(&mut fresh).await, "boot 1\nfirst\nsecond\nthird\n");

        // A new boot starts over with its own log only.
        log.start_fresh().unwrap();
        let mut vmm = appender(log.path());
        vmm.write_all(b"boot 2\n").unwrap();
        assert_eq!(read_all(&mut reader).await, "boot 2\n");
    }

    #[tokio::test]
    async fn a_large_log_comes_in_bounded_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        std::fs::write(&path, vec![b'x'; 3 * CHUNK + 5]).unwrap();
        let mut reader = ConsoleReader::open(path).await.unwrap();
        let mut sizes = Vec::new();
        while let Some(chunk) = reader.next_chunk().await {
            sizes.push(chunk.len());
        }
        assert_eq!(sizes.iter().sum::<usize>(), 3 * CHUNK + 5);
        assert!(sizes.iter().all(|&n| n <= CHUNK), "{sizes:?}");
    }
}
