//! Setup step 2: the guest's host name — the kernel's (`sethostname`), `/etc/hostname`, and a
//! `127.0.1.1` line in `/etc/hosts` so the name resolves without DNS (sudo and many tools look
//! it up).

use std::io;
use std::path::Path;

use crate::cmdline::Hostname;
use crate::guest::fsutil::write_atomic;

#[derive(Debug, thiserror::Error)]
pub enum HostnameError {
    #[error("cannot set the kernel host name to {name}")]
    Kernel {
        name: Hostname,
        #[source]
        source: nix::Error,
    },
    #[error("cannot write the host name into the guest's files")]
    Files(#[source] io::Error),
}

/// Applies `name` everywhere; `etc` is `/etc` in the guest (a scratch directory in tests).
pub fn apply(name: &Hostname, etc: &Path) -> Result<(), HostnameError> {
    nix::unistd::sethostname(name.as_str()).map_err(|source| HostnameError::Kernel {
        name: name.clone(),
        source,
    })?;
    write_files(name, etc)
}

/// Writes `/etc/hostname` and makes `/etc/hosts` map the name to 127.0.1.1.
pub fn write_files(name: &Hostname, etc: &Path) -> Result<(), HostnameError> {
    write_atomic(&etc.join("hostname"), format!("{name}\n").as_bytes(), 0o644)
        .map_err(HostnameError::Files)?;
    let hosts_path = etc.join("hosts");
    let existing = match fs_err::read_to_string(&hosts_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(HostnameError::Files(e)),
    };
    let updated = hosts_with_hostname(&existing, name.as_str());
    if updated != existing {
        write_atomic(&hosts_path, updated.as_bytes(), 0o644).map_err(HostnameError::Files)?;
    }
    Ok(())
}

/// Makes sure `etc/hosts` resolves `localhost`, for guests whose image ships no such file
/// (OCI images usually leave it to the container runtime). Returns whether it wrote.
pub fn ensure_localhost(etc: &Path) -> Result<bool, HostnameError> {
    let hosts_path = etc.join("hosts");
    let existing = match fs_err::read_to_string(&hosts_path) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(HostnameError::Files(e)),
    };
    let updated = hosts_with_localhost(&existing);
    if updated == existing {
        return Ok(false);
    }
    write_atomic(&hosts_path, updated.as_bytes(), 0o644).map_err(HostnameError::Files)?;
    Ok(true)
}

/// `existing` with `127.0.0.1 localhost` (and `::1 localhost` when the file was empty) in
/// front unless some line already maps `localhost`.
pub fn hosts_with_localhost(existing: &str) -> String {
    let maps_localhost = existing.lines().any(|l| {
        let l = l.split('#').next().unwrap_or_default();
        l.split_whitespace().skip(1).any(|name| name == "localhost")
    });
    if maps_localhost {
        return existing.to_string();
    }
    let mut out = String::from("127.0.0.1\tlocalhost\n");
    if existing.trim().is_empty() {
        out.push_str("::1\tlocalhost ip6-localhost ip6-loopback\n");
    } else {
        out.push_str(existing);
        if !existing.ends_with('\n') {
            out.push('\n');
        }
    }
    out
}

/// `/etc/hosts` with exactly one `127.0.1.1 NAME` line (after the `127.0.0.1` line, which is
/// added when missing); every other line is kept as it was.
pub fn hosts_with_hostname(existing: &str, name: &str) -> String {
    let first_field = |line: &str| line.split_whitespace().next().map(str::to_string);
    let mut lines: Vec<String> = existing
        .lines()
        .filter(|l| first_field(l).as_deref() != Some("127.0.1.1"))
        .map(str::to_string)
        .collect();
    let localhost = lines
        .iter()
        .position(|l| first_field(l).as_deref() == Some("127.0.0.1"));
    let at = match localhost {
        Some(i) => i + 1,
        None => {
            lines.insert(0, "127.0.0.1\tlocalhost".to_string());
            1
        }
    };
    lines.insert(at, format!("127.0.1.1\t{name}"));
    let mut out = lines.join("\n");
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debian_hosts_gets_its_127_0_1_1_line_replaced() {
        let before = "127.0.0.1\tlocalhost\n127.0.1.1\tdebian\n\n::1\tlocalhost ip6-localhost\n";
        assert_eq!(
            hosts_with_hostname(before, "dev"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tdev\n\n::1\tlocalhost ip6-localhost\n"
        );
    }

    #[test]
    fn empty_hosts_gets_localhost_and_the_name() {
        assert_eq!(
            hosts_with_hostname("", "dev"),
            "127.0.0.1\tlocalhost\n127.0.1.1\tdev\n"
        );
    }

    #[test]
    fn applying_twice_changes_nothing_more() {
        let once = hosts_with_hostname("127.0.0.1 localhost\n10.0.0.5 db\n", "dev");
        assert_eq!(hosts_with_hostname(&once, "dev"), once);
        assert!(once.contains("10.0.0.5 db"));
    }

    #[test]
    fn localhost_is_added_once_and_only_when_missing() {
        assert_eq!(
            hosts_with_localhost(""),
            "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        );
        assert_eq!(
            hosts_with_localhost("10.0.0.5 db"),
            "127.0.0.1\tlocalhost\n10.0.0.5 db\n"
        );
        let debian = "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost\n";
        assert_eq!(hosts_with_localhost(debian), debian);
        // A commented-out mapping does not count.
        assert!(
            hosts_with_localhost("# 127.0.0.1 localhost\n").starts_with("127.0.0.1\tlocalhost\n#")
        );
    }

    #[test]
    fn a_missing_hosts_file_is_created_and_a_symlinked_one_replaced() {
        let etc = tempfile::tempdir().unwrap();
        assert!(ensure_localhost(etc.path()).unwrap());
        assert!(!ensure_localhost(etc.path()).unwrap());
        let hosts = etc.path().join("hosts");
        assert!(std::fs::read_to_string(&hosts)
            .unwrap()
            .starts_with("127.0.0.1\tlocalhost\n"));

        let elsewhere = etc.path().join("elsewhere");
        std::fs::write(&elsewhere, "10.0.0.5 db\n").unwrap();
        std::fs::remove_file(&hosts).unwrap();
        std::os::unix::fs::symlink(&elsewhere, &hosts).unwrap();
        assert!(ensure_localhost(etc.path()).unwrap());
        assert_eq!(
            std::fs::read_to_string(&elsewhere).unwrap(),
            "10.0.0.5 db\n"
        );
        assert!(!std::fs::symlink_metadata(&hosts).unwrap().is_symlink());

        // A dangling symlink reads as missing and is replaced the same way.
        std::fs::remove_file(&hosts).unwrap();
        std::os::unix::fs::symlink("/nonexistent/hosts", &hosts).unwrap();
        assert!(ensure_localhost(etc.path()).unwrap());
        assert!(!std::fs::symlink_metadata(&hosts).unwrap().is_symlink());
    }

    #[test]
    fn no_etc_at_all_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ensure_localhost(&dir.path().join("etc")).is_err());
        let name: Hostname = "box".parse().unwrap();
        assert!(write_files(&name, &dir.path().join("etc")).is_err());
    }

    #[test]
    fn files_are_written_into_the_given_etc() {
        let etc = tempfile::tempdir().unwrap();
        std::fs::write(etc.path().join("hosts"), "127.0.0.1 localhost\n").unwrap();
        let name: Hostname = "box-1".parse().unwrap();
        write_files(&name, etc.path()).unwrap();
        let read = |f: &str| std::fs::read_to_string(etc.path().join(f)).unwrap();
        assert_eq!(read("hostname"), "box-1\n");
        assert_eq!(read("hosts"), "127.0.0.1 localhost\n127.0.1.1\tbox-1\n");
    }
}
