//! The end of a log file, for failure messages: what a VMM, a guest's console or debootstrap
//! said last before something went wrong.
//!
//! It lives here because every crate that quotes a log (banger-vmm, banger-image, the daemon)
//! already depends on this one for where those logs are. It reads at most the last
//! [`TAIL_BYTES`] of the file, however large the log has grown: a console log of a guest that
//! ran for weeks may be gigabytes, and an error message needs a screenful.

use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

/// How much of a log's end is read to find its last lines.
pub const TAIL_BYTES: u64 = 64 * 1024;

/// The last `n` lines of `path` that `keep` accepts, oldest first. Only the file's last
/// [`TAIL_BYTES`] are read; a line cut by that window is left out rather than shown in part.
/// A missing or unreadable file has no lines: a failure message must not fail for want of a log.
pub fn last_lines(path: &Path, n: usize, keep: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES);
    if file.seek(SeekFrom::Start(start)).is_err() {
        return Vec::new();
    }
    let mut buf = Vec::new();
    if file.take(TAIL_BYTES).read_to_end(&mut buf).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        // The window began somewhere inside this line.
        lines.remove(0);
    }
    let kept: Vec<&str> = lines.into_iter().filter(|l| keep(l)).collect();
    kept[kept.len().saturating_sub(n)..]
        .iter()
        .map(|l| (*l).to_owned())
        .collect()
}

/// [`last_lines`] of every line, joined with newlines (empty when there are none).
pub fn tail(path: &Path, n: usize) -> String {
    last_lines(path, n, |_| true).join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_lines_come_back_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let text: String = (1..=30).map(|i| format!("line {i}\n")).collect();
        std::fs::write(&p, text).unwrap();
        assert_eq!(tail(&p, 2), "line 29\nline 30");
        assert_eq!(tail(&p, 100).lines().count(), 30);
        assert_eq!(tail(&dir.path().join("missing"), 2), "");
    }

    #[test]
    fn blank_lines_can_be_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        std::fs::write(&p, "a\n\nb\nc\n\n").unwrap();
        assert_eq!(last_lines(&p, 2, |l| !l.trim().is_empty()), ["b", "c"]);
        std::fs::write(&p, "").unwrap();
        assert!(last_lines(&p, 5, |_| true).is_empty());
    }

    #[test]
    fn a_huge_log_is_read_only_at_its_end() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        // A sparse 1 GiB file whose only text is at the end: reading it whole would take
        // seconds and a gigabyte of memory.
        let f = std::fs::File::create(&p).unwrap();
        f.set_len(1 << 30).unwrap();
        drop(f);
        let mut f = std::fs::OpenOptions::new().append(true).open(&p).unwrap();
        std::io::Write::write_all(&mut f, b"\nkernel panic\nend\n").unwrap();
        let t = std::time::Instant::now();
        assert_eq!(tail(&p, 2), "kernel panic\nend");
        assert!(t.elapsed() < std::time::Duration::from_secs(1));
    }

    #[test]
    fn a_line_cut_by_the_window_is_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("log");
        let long = "x".repeat(TAIL_BYTES as usize);
        std::fs::write(&p, format!("{long}\nlast\n")).unwrap();
        assert_eq!(last_lines(&p, 5, |_| true), ["last"]);
    }
}
