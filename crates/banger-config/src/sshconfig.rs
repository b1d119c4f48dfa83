//! OpenSSH client configuration: the file banger owns (`~/.config/banger/ssh_config`, one
//! `Host <vm>.vm` entry per VM) and the marker-fenced `Include` block that `ssh-config --install`
//! puts in the user's `~/.ssh/config` and `--uninstall` takes out again.
//!
//! Editing the user's file is pure byte-in/byte-out ([`install`], [`uninstall`]) so it can be
//! tested exhaustively; [`write_atomically`] is the only function that touches the disk. The
//! contract is that install followed by uninstall gives back the original file byte for byte:
//! line endings, a missing final newline, comments and every other line are left alone.
//! Deciding *when* to rewrite the files (the daemon, on VM changes) is left to callers.

use std::fs;
use std::io::{self, Write};
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// First line of the block banger adds to `~/.ssh/config`.
pub const BEGIN_MARKER: &str = "# >>> banger >>>";
/// Last line of the block banger adds to `~/.ssh/config`.
pub const END_MARKER: &str = "# <<< banger <<<";

/// Permissions of `~/.ssh` when banger has to create it; ssh refuses group/world-writable dirs.
const SSH_DIR_MODE: u32 = 0o700;
/// Permissions for a new `~/.ssh/config`; ssh refuses a config others can write.
pub const NEW_CONFIG_MODE: u32 = 0o600;

/// The `Include` directive that pulls banger's per-VM host entries into the user's config.
pub fn include_line(ssh_config_path: &Path) -> String {
    format!("Include {}", quote_arg(&ssh_config_path.to_string_lossy()))
}

/// The text between the markers for the usual case: a comment and the `Include` line.
pub fn include_block_body(ssh_config_path: &Path) -> String {
    format!(
        "# Added by `banger ssh-config --install`; remove with `banger ssh-config --uninstall`.\n{}",
        include_line(ssh_config_path)
    )
}

/// Returns `existing` with banger's block holding `block_body` (usually [`include_block_body`]).
///
/// The block goes at the top: OpenSSH applies an `Include` only to the `Host`/`Match` section it
/// sits in, so anywhere after the first `Host` line it would be silently scoped to that host.
/// A block that already sits above every `Host`/`Match` line is replaced in place; one that was
/// moved below them is taken out and put back at the top. Installing twice gives one block.
pub fn install(existing: Option<&[u8]>, block_body: &str) -> Vec<u8> {
    let existing = existing.unwrap_or_default();
    let eol = detect_eol(existing);
    let block = render_block(block_body, eol);
    let blocks = find_blocks(existing);

    if let Some(first) = blocks.first() {
        if !has_section_before(existing, first.start) {
            let mut out = Vec::with_capacity(existing.len() + block.len());
            out.extend_from_slice(&existing[..first.start]);
            out.extend_from_slice(&block);
            let mut cursor = first.end;
            // Duplicate blocks (older banger, hand edits) would make uninstall leave one behind.
            for dup in &blocks[1..] {
                out.extend_from_slice(&existing[cursor..dup.start]);
                cursor = dup.end;
            }
            out.extend_from_slice(&existing[cursor..]);
            return out;
        }
    }

    let rest = if blocks.is_empty() {
        existing.to_vec()
    } else {
        uninstall(existing)
    };
    let mut out = Vec::with_capacity(rest.len() + block.len() + eol.len());
    out.extend_from_slice(&block);
    if !rest.is_empty() {
        // A blank line keeps the block visually apart; uninstall removes exactly this line.
        out.extend_from_slice(eol.as_bytes());
        out.extend_from_slice(&rest);
    }
    out
}

/// Returns `existing` without banger's block(s) and without the blank separator line that
/// [`install`] put after a block at the top of the file. Everything else is kept byte for byte.
/// A begin marker with no end marker after it is left alone rather than guessing where it ends.
pub fn uninstall(existing: &[u8]) -> Vec<u8> {
    let mut current = remove_blocks(existing);
    // Stray markers around a removed block can pair up into a new block (hand edits, nested
    // markers); keep going so the result never reads as installed.
    while is_installed(&current) {
        current = remove_blocks(&current);
    }
    current
}

fn remove_blocks(existing: &[u8]) -> Vec<u8> {
    let blocks = find_blocks(existing);
    let mut out = Vec::with_capacity(existing.len());
    let mut cursor = 0;
    for block in &blocks {
        out.extend_from_slice(&existing[cursor..block.start]);
        cursor = block.end;
        if block.start == 0 {
            cursor += separator_len(&existing[cursor..]);
        }
    }
    out.extend_from_slice(&existing[cursor..]);
    out
}

/// Whether `existing` holds a complete banger block.
pub fn is_installed(existing: &[u8]) -> bool {
    !find_blocks(existing).is_empty()
}

/// Replaces `path` with `bytes` so that readers see the old or the new file, never a torn one:
/// write a temporary file in the same directory, fsync it, rename it over `path`, fsync the
/// directory. An existing file keeps its permissions; a new one gets `mode_if_new`. A missing
/// parent directory is created with mode 0700 (the `~/.ssh` case). If `path` is a symlink (a
/// dotfiles manager), the file it points to is replaced and the link is kept.
pub fn write_atomically(path: &Path, bytes: &[u8], mode_if_new: u32) -> io::Result<()> {
    let target = resolve_symlink(path)?;
    let dir = match target.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => PathBuf::from("."),
    };
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(SSH_DIR_MODE)
            .create(&dir)
            .map_err(|e| with_path(e, "creating directory", &dir))?;
    }
    let mode = match fs::metadata(&target) {
        Ok(meta) => meta.permissions().mode() & 0o7777,
        Err(e) if e.kind() == io::ErrorKind::NotFound => mode_if_new,
        Err(e) => return Err(with_path(e, "reading permissions of", &target)),
    };

    let file_name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "config".to_owned());
    // The pid tells processes apart and the counter calls within one (the daemon refreshes
    // names from many tasks): two writers sharing a temporary file could each rename the
    // other's half-written bytes into place.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = dir.join(format!(
        ".{file_name}.banger-tmp.{}.{n}",
        std::process::id()
    ));
    let result = write_and_rename(&tmp, &target, bytes, mode);
    if result.is_err() {
        // Best effort: the error being returned matters more than a leftover temp file.
        let _ = fs::remove_file(&tmp);
    }
    result?;
    if let Ok(d) = fs::File::open(&dir) {
        d.sync_all()
            .map_err(|e| with_path(e, "syncing directory", &dir))?;
    }
    Ok(())
}

fn write_and_rename(tmp: &Path, target: &Path, bytes: &[u8], mode: u32) -> io::Result<()> {
    // A leftover from a crashed run with the same pid and count would make create_new fail.
    match fs::remove_file(tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(with_path(e, "removing stale temporary file", tmp)),
    }
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(tmp)
        .map_err(|e| with_path(e, "creating temporary file", tmp))?;
    // The umask may have narrowed `mode` at creation; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(|e| with_path(e, "setting permissions of", tmp))?;
    file.write_all(bytes)
        .map_err(|e| with_path(e, "writing", tmp))?;
    file.sync_all().map_err(|e| with_path(e, "syncing", tmp))?;
    drop(file);
    fs::rename(tmp, target).map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("renaming {} to {}: {e}", tmp.display(), target.display()),
        )
    })
}

/// Follows a chain of symlinks at `path` to the file that should really be replaced.
fn resolve_symlink(path: &Path) -> io::Result<PathBuf> {
    let mut current = path.to_path_buf();
    // A cycle of links would otherwise loop forever; 40 is the kernel's own limit.
    for _ in 0..40 {
        match fs::symlink_metadata(&current) {
            Ok(meta) if meta.file_type().is_symlink() => {
                let link = fs::read_link(&current)
                    .map_err(|e| with_path(e, "reading symlink", &current))?;
                current = match current.parent() {
                    Some(parent) if link.is_relative() => parent.join(link),
                    _ => link,
                };
            }
            Ok(_) => return Ok(current),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(current),
            Err(e) => return Err(with_path(e, "inspecting", &current)),
        }
    }
    Err(io::Error::other(format!(
        "too many levels of symbolic links at {}",
        path.display()
    )))
}

fn with_path(e: io::Error, action: &str, path: &Path) -> io::Error {
    io::Error::new(e.kind(), format!("{action} {}: {e}", path.display()))
}

/// One VM as it appears in banger's own ssh_config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostEntry {
    /// VM name; the ssh host is `<name>.vm`, the same name banger's DNS answers.
    pub name: String,
    pub ip: IpAddr,
    pub identity_file: PathBuf,
    /// banger's known_hosts file, filled with each VM's host key when it is created.
    pub known_hosts: PathBuf,
}

/// The contents of `~/.config/banger/ssh_config`: a header and one `Host <name>.vm` block per VM.
///
/// `HostKeyAlias` makes ssh look host keys up by VM name rather than IP, so an address reused
/// by a later VM is not mistaken for a changed host key of the earlier one.
pub fn render_ssh_config(entries: &[HostEntry]) -> String {
    let mut out = String::from(
        "# Managed by banger: rewritten whenever VMs are created or removed. Do not edit;\n\
         # changes here are lost. Pulled into ~/.ssh/config by `banger ssh-config --install`.\n",
    );
    for entry in entries {
        let host = format!("{}.vm", entry.name);
        out.push('\n');
        out.push_str(&format!("Host {host}\n"));
        out.push_str(&format!("    HostName {}\n", entry.ip));
        out.push_str("    User root\n");
        out.push_str(&format!(
            "    IdentityFile {}\n",
            quote_arg(&entry.identity_file.to_string_lossy())
        ));
        out.push_str("    IdentitiesOnly yes\n");
        out.push_str(&format!(
            "    UserKnownHostsFile {}\n",
            quote_arg(&entry.known_hosts.to_string_lossy())
        ));
        out.push_str("    StrictHostKeyChecking yes\n");
        out.push_str(&format!("    HostKeyAlias {host}\n"));
    }
    out
}

/// ssh_config splits arguments on whitespace; double quotes keep a path with spaces whole.
fn quote_arg(arg: &str) -> String {
    if arg.chars().any(char::is_whitespace) {
        format!("\"{arg}\"")
    } else {
        arg.to_owned()
    }
}

/// The file's own line ending, so a CRLF file does not get LF lines in the middle of it.
fn detect_eol(bytes: &[u8]) -> &'static str {
    match bytes.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && bytes[i - 1] == b'\r' => "\r\n",
        _ => "\n",
    }
}

fn render_block(body: &str, eol: &str) -> Vec<u8> {
    let mut block = String::new();
    block.push_str(BEGIN_MARKER);
    block.push_str(eol);
    for line in body.trim_end_matches(['\r', '\n']).lines() {
        block.push_str(line);
        block.push_str(eol);
    }
    block.push_str(END_MARKER);
    block.push_str(eol);
    block.into_bytes()
}

/// Byte range of one block: from the start of its begin line to just past its end line's
/// terminator (or the end of the file when the end line has none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Span {
    start: usize,
    end: usize,
}

/// Lines of `bytes` as (start, end-including-terminator, content-without-terminator).
fn lines(bytes: &[u8]) -> impl Iterator<Item = (usize, usize, &[u8])> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= bytes.len() {
            return None;
        }
        let start = pos;
        let end = match bytes[start..].iter().position(|&b| b == b'\n') {
            Some(i) => start + i + 1,
            None => bytes.len(),
        };
        pos = end;
        let mut content = &bytes[start..end];
        if let Some(c) = content.strip_suffix(b"\n") {
            content = c;
        }
        if let Some(c) = content.strip_suffix(b"\r") {
            content = c;
        }
        Some((start, end, content))
    })
}

fn is_marker(line: &[u8], marker: &str) -> bool {
    line.trim_ascii() == marker.as_bytes()
}

fn find_blocks(bytes: &[u8]) -> Vec<Span> {
    let mut blocks = Vec::new();
    let mut open: Option<usize> = None;
    for (start, end, content) in lines(bytes) {
        if is_marker(content, BEGIN_MARKER) {
            // A second begin before an end means the first was never closed: drop it.
            open = Some(start);
        } else if is_marker(content, END_MARKER) {
            if let Some(block_start) = open.take() {
                blocks.push(Span {
                    start: block_start,
                    end,
                });
            }
        }
    }
    blocks
}

/// Length of one empty line (`\n` or `\r\n`) at the start of `rest`, else 0.
fn separator_len(rest: &[u8]) -> usize {
    if rest.starts_with(b"\r\n") {
        2
    } else if rest.starts_with(b"\n") {
        1
    } else {
        0
    }
}

/// Whether a `Host` or `Match` keyword line appears before byte `offset`.
fn has_section_before(bytes: &[u8], offset: usize) -> bool {
    lines(&bytes[..offset]).any(|(_, _, content)| {
        let word = content
            .trim_ascii_start()
            .split(|b| b.is_ascii_whitespace() || *b == b'=')
            .next()
            .unwrap_or_default();
        word.eq_ignore_ascii_case(b"host") || word.eq_ignore_ascii_case(b"match")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const BODY: &str = "Include /home/u/.config/banger/ssh_config";

    fn block_lf() -> String {
        format!("{BEGIN_MARKER}\n{BODY}\n{END_MARKER}\n")
    }

    fn round_trip(original: &[u8]) {
        let installed = install(Some(original), BODY);
        assert!(is_installed(&installed), "no block in {installed:?}");
        assert_eq!(
            uninstall(&installed),
            original,
            "install then uninstall changed {:?}",
            String::from_utf8_lossy(original)
        );
        let twice = install(Some(&installed), BODY);
        assert_eq!(twice, installed, "second install changed the file");
    }

    #[test]
    fn include_line_points_at_banger_ssh_config() {
        assert_eq!(
            include_line(Path::new("/home/u/.config/banger/ssh_config")),
            "Include /home/u/.config/banger/ssh_config"
        );
    }

    #[test]
    fn include_line_quotes_paths_with_spaces() {
        assert_eq!(
            include_line(Path::new("/home/a b/.config/banger/ssh_config")),
            "Include \"/home/a b/.config/banger/ssh_config\""
        );
    }

    #[test]
    fn install_without_file_writes_only_the_block() {
        assert_eq!(install(None, BODY), block_lf().into_bytes());
        assert_eq!(uninstall(&install(None, BODY)), b"");
    }

    #[test]
    fn install_into_empty_file_writes_only_the_block() {
        assert_eq!(install(Some(b""), BODY), block_lf().into_bytes());
        round_trip(b"");
    }

    #[test]
    fn install_puts_block_before_first_host() {
        let original = b"# my config\nHost github.com\n    User git\n";
        let installed = install(Some(original), BODY);
        let expected = format!(
            "{}\n# my config\nHost github.com\n    User git\n",
            block_lf()
        );
        assert_eq!(String::from_utf8_lossy(&installed), expected);
        round_trip(original);
    }

    #[test]
    fn file_without_trailing_newline_is_restored_exactly() {
        round_trip(b"Host a\n    User x");
        let installed = install(Some(b"Host a\n    User x"), BODY);
        assert!(installed.ends_with(b"    User x"));
    }

    #[test]
    fn crlf_file_gets_crlf_block_and_round_trips() {
        let original = b"Host a\r\n    User x\r\n";
        let installed = install(Some(original), BODY);
        let expected =
            format!("{BEGIN_MARKER}\r\n{BODY}\r\n{END_MARKER}\r\n\r\nHost a\r\n    User x\r\n");
        assert_eq!(String::from_utf8_lossy(&installed), expected);
        round_trip(original);
    }

    #[test]
    fn leading_blank_lines_and_comments_survive() {
        round_trip(b"\n\n# comment\n\nHost *\n  ServerAliveInterval 30\n\nHost b\n  Port 2222\n");
        round_trip(b"\n");
        round_trip(b"\r\n");
        round_trip(b"x");
        round_trip(b"  \t\n");
    }

    #[test]
    fn installing_twice_keeps_one_block() {
        let once = install(Some(b"Host a\n"), BODY);
        let twice = install(Some(&once), BODY);
        assert_eq!(once, twice);
        let text = String::from_utf8_lossy(&twice);
        assert_eq!(text.matches(BEGIN_MARKER).count(), 1);
    }

    #[test]
    fn reinstall_replaces_block_body_in_place() {
        let old = format!("# mine\n{BEGIN_MARKER}\nInclude /old/path\n{END_MARKER}\nHost a\n");
        let new = install(Some(old.as_bytes()), BODY);
        assert_eq!(
            String::from_utf8_lossy(&new),
            format!("# mine\n{}Host a\n", block_lf())
        );
    }

    #[test]
    fn block_below_a_host_line_moves_to_the_top() {
        let old = format!("Host a\n  User x\n{BEGIN_MARKER}\n{BODY}\n{END_MARKER}\nHost b\n");
        let new = install(Some(old.as_bytes()), BODY);
        assert_eq!(
            String::from_utf8_lossy(&new),
            format!("{}\nHost a\n  User x\nHost b\n", block_lf())
        );
    }

    #[test]
    fn duplicate_blocks_collapse_into_one() {
        let old = format!("{}{}Host a\n", block_lf(), block_lf());
        let new = install(Some(old.as_bytes()), BODY);
        assert_eq!(
            String::from_utf8_lossy(&new),
            format!("{}Host a\n", block_lf())
        );
        assert_eq!(uninstall(old.as_bytes()), b"Host a\n");
    }

    #[test]
    fn uninstall_without_block_changes_nothing() {
        let original = b"Host a\n  User x\n# >>> not banger >>>\n";
        assert_eq!(uninstall(original), original);
        assert!(!is_installed(original));
    }

    #[test]
    fn uninstall_leaves_unterminated_begin_marker_alone() {
        let original = format!("{BEGIN_MARKER}\nHost a\n  User x\n");
        assert_eq!(uninstall(original.as_bytes()), original.as_bytes());
        // Installing still works and removing it again gives the same bytes back.
        round_trip(original.as_bytes());
    }

    #[test]
    fn uninstall_removes_block_in_the_middle_without_touching_neighbours() {
        let original = format!("# a\n\n{BEGIN_MARKER}\n{BODY}\n{END_MARKER}\n\nHost a\n");
        assert_eq!(uninstall(original.as_bytes()), b"# a\n\n\nHost a\n");
    }

    #[test]
    fn uninstall_handles_end_marker_without_newline_at_eof() {
        let original = format!("Host a\n{BEGIN_MARKER}\n{BODY}\n{END_MARKER}");
        assert_eq!(uninstall(original.as_bytes()), b"Host a\n");
    }

    #[test]
    fn uninstall_keeps_user_blank_line_when_block_was_not_separated() {
        // The user deleted banger's separator; the next blank line is theirs and stays.
        let original = format!("{}Host a\n\nHost b\n", block_lf());
        assert_eq!(uninstall(original.as_bytes()), b"Host a\n\nHost b\n");
    }

    #[test]
    fn uninstall_removes_blocks_formed_by_stray_nested_markers() {
        let original = format!("Host a\n{BEGIN_MARKER}\n{}{END_MARKER}\n", block_lf());
        assert_eq!(uninstall(original.as_bytes()), b"Host a\n");
    }

    /// Asks the real ssh client how it resolves a host, proving the Include at the top applies
    /// to VM names even when the user's file has its own `Host` sections below it.
    #[test]
    fn installed_include_is_honoured_by_openssh() {
        let dir = tempfile::tempdir().unwrap();
        let banger_config = dir.path().join("banger ssh_config");
        let entries = [HostEntry {
            name: "sandbox".into(),
            ip: "172.16.0.9".parse().unwrap(),
            identity_file: dir.path().join("id_ed25519"),
            known_hosts: dir.path().join("known_hosts"),
        }];
        fs::write(&banger_config, render_ssh_config(&entries)).unwrap();
        let user_config = dir.path().join("config");
        let original = b"Host github.com\n    User git\n";
        let installed = install(Some(original), &include_block_body(&banger_config));
        write_atomically(&user_config, &installed, NEW_CONFIG_MODE).unwrap();

        let out = std::process::Command::new("ssh")
            .arg("-G")
            .arg("-F")
            .arg(&user_config)
            .arg("sandbox.vm")
            .output()
            .expect("the ssh client must be installed to run this test");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let resolved = String::from_utf8_lossy(&out.stdout);
        assert!(resolved.contains("\nhostname 172.16.0.9\n"), "{resolved}");
        assert!(resolved.contains("\nuser root\n"), "{resolved}");
        assert!(
            resolved.contains("\nhostkeyalias sandbox.vm\n"),
            "{resolved}"
        );
        assert!(
            resolved.contains("\nstricthostkeychecking true\n"),
            "{resolved}"
        );
    }

    #[test]
    fn match_keyword_and_equals_syntax_count_as_sections() {
        assert!(has_section_before(b"Match all\n", 10));
        assert!(has_section_before(b"  host=foo\n", 11));
        assert!(!has_section_before(b"# Host foo\nHostName x\n", 22));
    }

    /// A small deterministic generator stands in for a property-testing crate: every
    /// combination of these line kinds, endings and final-newline choices must round-trip.
    #[test]
    fn install_uninstall_round_trips_generated_files() {
        let pieces: [&[u8]; 9] = [
            b"Host a",
            b"# comment",
            b"",
            b"  User root",
            b"Match host x",
            b"\t",
            b"# >>> banger >>>",
            b"# <<< banger <<<",
            b"Include other",
        ];
        let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let n_lines = (next() % 7) as usize;
            let crlf = next() % 3 == 0;
            let mut file = Vec::new();
            for i in 0..n_lines {
                file.extend_from_slice(pieces[(next() % pieces.len() as u64) as usize]);
                let last = i + 1 == n_lines;
                if !last || next() % 2 == 0 {
                    file.extend_from_slice(if crlf && next() % 5 != 0 {
                        b"\r\n"
                    } else {
                        b"\n"
                    });
                }
            }
            // Files that already hold a complete block are not "originals" for this property.
            if is_installed(&file) {
                let once = install(Some(&file), BODY);
                assert_eq!(install(Some(&once), BODY), once, "{file:?}");
                assert!(!is_installed(&uninstall(&once)), "{file:?}");
                continue;
            }
            round_trip(&file);
        }
    }

    #[test]
    fn render_ssh_config_writes_one_host_block_per_vm() {
        let entries = [HostEntry {
            name: "sandbox".into(),
            ip: "172.16.0.2".parse().unwrap(),
            identity_file: "/home/u/.config/banger/ssh/id_ed25519".into(),
            known_hosts: "/home/u/.config/banger/ssh/known_hosts".into(),
        }];
        let text = render_ssh_config(&entries);
        assert!(text.starts_with("# Managed by banger"));
        let expected = "\nHost sandbox.vm\n    HostName 172.16.0.2\n    User root\n    \
                        IdentityFile /home/u/.config/banger/ssh/id_ed25519\n    IdentitiesOnly yes\n    \
                        UserKnownHostsFile /home/u/.config/banger/ssh/known_hosts\n    \
                        StrictHostKeyChecking yes\n    HostKeyAlias sandbox.vm\n";
        assert!(text.ends_with(expected), "{text}");
    }

    #[test]
    fn render_ssh_config_with_no_vms_is_just_the_header() {
        let text = render_ssh_config(&[]);
        assert!(!text.contains("Host "));
        assert!(text.lines().all(|l| l.starts_with('#')));
    }

    #[test]
    fn write_atomically_creates_ssh_dir_and_private_file() {
        let home = tempfile::tempdir().unwrap();
        let path = home.path().join(".ssh/config");
        write_atomically(&path, b"hello", NEW_CONFIG_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"hello");
        let dir_mode = fs::metadata(home.path().join(".ssh"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(dir_mode & 0o777, 0o700);
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let leftovers: Vec<_> = fs::read_dir(home.path().join(".ssh"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers, vec![std::ffi::OsString::from("config")]);
    }

    #[test]
    fn concurrent_writers_each_leave_a_whole_file_and_no_temporary_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ssh_config");
        let texts: Vec<Vec<u8>> = (0..8u8).map(|i| vec![b'a' + i; 64 << 10]).collect();
        std::thread::scope(|s| {
            for text in &texts {
                let path = &path;
                s.spawn(move || {
                    for _ in 0..20 {
                        write_atomically(path, text, NEW_CONFIG_MODE).unwrap();
                    }
                });
            }
        });
        let now = fs::read(&path).unwrap();
        assert!(texts.contains(&now), "a torn file");
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("ssh_config")]);
    }

    #[test]
    fn write_atomically_keeps_existing_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        fs::write(&path, b"old").unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        write_atomically(&path, b"new", NEW_CONFIG_MODE).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        let mode = fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
    }

    #[test]
    fn write_atomically_replaces_symlink_target_and_keeps_link() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("dotfiles-ssh-config");
        fs::write(&real, b"old").unwrap();
        let link = dir.path().join("config");
        std::os::unix::fs::symlink("dotfiles-ssh-config", &link).unwrap();
        write_atomically(&link, b"new", NEW_CONFIG_MODE).unwrap();
        assert!(fs::symlink_metadata(&link)
            .unwrap()
            .file_type()
            .is_symlink());
        assert_eq!(fs::read(&real).unwrap(), b"new");
    }

    #[test]
    fn write_atomically_error_names_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let blocker = dir.path().join("file");
        fs::write(&blocker, b"").unwrap();
        let err = write_atomically(&blocker.join("config"), b"x", NEW_CONFIG_MODE).unwrap_err();
        assert!(
            err.to_string().contains(&blocker.display().to_string()),
            "{err}"
        );
    }
}
