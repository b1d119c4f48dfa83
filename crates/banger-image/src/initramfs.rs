//! Writing initramfs archives: the cpio "newc" format the kernel unpacks into its first root.
//!
//! Two archives use it: the kernel's *modules initrd* (`/lib/modules/RELEASE/...ko` and
//! `/banger/modules`, built once per kernel by [`crate::kernel`]), and the small per-VM archive
//! the daemon appends to it at VM start ([`agent_archive`]: `/init` = the agent, and
//! `/banger/image.json`). The kernel unpacks concatenated archives one after the other into
//! the same tree, so the pair behaves as one.
//!
//! Archives are reproducible: every entry is owned by root with mtime 0, inode numbers count
//! up from 1 in writing order, and directories are written before anything inside them
//! (the kernel creates no missing parents). Names are stored relative (`lib/...`, as `cpio`
//! itself writes them) and must be plain: no `.`/`..` components, no empty ones, no NUL.
//!
//! Leaves to others: what goes into an archive, and where the archive is stored.

use std::collections::BTreeSet;
use std::io::{self, Read, Write};
use std::path::Path;

const MAGIC: &str = "070701";
const TRAILER: &str = "TRAILER!!!";
const HEADER_LEN: usize = 110;

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

/// Where [`agent_archive`] puts the agent binary: the kernel runs `/init` from the initramfs.
pub const INIT_PATH: &str = "init";
/// Where [`agent_archive`] puts the image's runtime configuration (the agent reads it).
pub const IMAGE_JSON_PATH: &str = "banger/image.json";
/// The module load list in the modules initrd: one path per line, dependencies first.
pub const MODULE_LIST_PATH: &str = "banger/modules";

/// A streaming writer of one newc archive. Call [`CpioWriter::finish`] to write the trailer;
/// an archive without it is incomplete.
pub struct CpioWriter<W: Write> {
    out: W,
    next_ino: u32,
    /// Directories already in the archive (so parents are written once, before their content).
    dirs: BTreeSet<String>,
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Checks `path` and returns it relative, without a leading `/`.
fn archive_name(path: &str) -> io::Result<&str> {
    let rel = path.strip_prefix('/').unwrap_or(path);
    let bad = rel.is_empty()
        || rel.contains('\0')
        || rel
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..");
    if bad {
        return Err(invalid(format!(
            "{path:?} is not a plain path for an initramfs entry"
        )));
    }
    Ok(rel)
}

fn pad_len(len: usize) -> usize {
    (4 - len % 4) % 4
}

impl<W: Write> CpioWriter<W> {
    pub fn new(out: W) -> Self {
        CpioWriter {
            out,
            next_ino: 1,
            dirs: BTreeSet::new(),
        }
    }

    fn header(&mut self, name: &str, mode: u32, nlink: u32, size: u64) -> io::Result<()> {
        let size = u32::try_from(size).map_err(|_| {
            invalid(format!(
                "{name} is larger than a cpio entry can hold (4 GiB)"
            ))
        })?;
        let name_len = name.len() + 1;
        let name_size = u32::try_from(name_len)
            .map_err(|_| invalid(format!("entry name of {name_len} bytes is too long")))?;
        let ino = if name == TRAILER { 0 } else { self.next_ino };
        self.next_ino = self.next_ino.wrapping_add(1);
        // ino mode uid gid nlink mtime filesize devmajor devminor rdevmajor rdevminor namesize check
        let header = format!(
            "{MAGIC}{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{name_size:08x}{:08x}",
            0, 0, 0, 0, 0, 0, 0, 0
        );
        debug_assert_eq!(header.len(), HEADER_LEN);
        self.out.write_all(header.as_bytes())?;
        self.out.write_all(name.as_bytes())?;
        self.out
            .write_all(&[0u8; 4][..1 + pad_len(HEADER_LEN + name_len)])
    }

    fn pad_data(&mut self, len: u64) -> io::Result<()> {
        self.out.write_all(&[0u8; 3][..pad_len((len % 4) as usize)])
    }

    /// Writes the directories above `name` that are not in the archive yet.
    fn parents(&mut self, name: &str) -> io::Result<()> {
        let mut end = 0;
        while let Some(i) = name[end..].find('/') {
            end += i;
            let parent = &name[..end];
            if !self.dirs.contains(parent) {
                self.header(parent, S_IFDIR | 0o755, 2, 0)?;
                self.dirs.insert(parent.to_owned());
            }
            end += 1;
        }
        Ok(())
    }

    /// A directory with permission bits `mode` (missing parents get 0755). Writing one that is
    /// already in the archive does nothing.
    pub fn dir(&mut self, path: &str, mode: u32) -> io::Result<()> {
        let name = archive_name(path)?;
        if self.dirs.contains(name) {
            return Ok(());
        }
        self.parents(name)?;
        self.header(name, S_IFDIR | (mode & 0o7777), 2, 0)?;
        self.dirs.insert(name.to_owned());
        Ok(())
    }

    /// A regular file of exactly `size` bytes read from `content`.
    pub fn file(
        &mut self,
        path: &str,
        mode: u32,
        size: u64,
        content: &mut dyn Read,
    ) -> io::Result<()> {
        let name = archive_name(path)?;
        self.parents(name)?;
        self.header(name, S_IFREG | (mode & 0o7777), 1, size)?;
        let copied = io::copy(&mut content.take(size), &mut self.out)?;
        if copied != size {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("{name}: expected {size} bytes, the source ended after {copied}"),
            ));
        }
        self.pad_data(size)
    }

    /// A regular file holding `data`.
    pub fn file_bytes(&mut self, path: &str, mode: u32, data: &[u8]) -> io::Result<()> {
        self.file(path, mode, data.len() as u64, &mut &data[..])
    }

    /// A symbolic link to `target` (stored as given; the kernel does not resolve it).
    pub fn symlink(&mut self, path: &str, target: &str) -> io::Result<()> {
        let name = archive_name(path)?;
        if target.is_empty() || target.contains('\0') {
            return Err(invalid(format!("{target:?} is not a symlink target")));
        }
        self.parents(name)?;
        self.header(name, S_IFLNK | 0o777, 1, target.len() as u64)?;
        self.out.write_all(target.as_bytes())?;
        self.pad_data(target.len() as u64)
    }

    /// Writes the trailer and returns the output.
    pub fn finish(mut self) -> io::Result<W> {
        self.header(TRAILER, 0, 1, 0)?;
        self.out.flush()?;
        Ok(self.out)
    }
}

/// The per-VM archive appended to a kernel's modules initrd: `/init` (the statically linked
/// agent at `agent_binary`, mode 0755) and `/banger/image.json` (0644) holding `image_json`.
pub fn agent_archive(
    agent_binary: &Path,
    image_json: &[u8],
    out: &mut impl Write,
) -> io::Result<()> {
    let mut agent = fs_err::File::open(agent_binary)?;
    let size = agent.metadata()?.len();
    let mut w = CpioWriter::new(out);
    w.file(INIT_PATH, 0o755, size, &mut agent)?;
    w.dir("banger", 0o755)?;
    w.file_bytes(IMAGE_JSON_PATH, 0o644, image_json)?;
    w.finish()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use std::process::{Command, Stdio};

    fn sample() -> Vec<u8> {
        let mut w = CpioWriter::new(Vec::new());
        w.file_bytes(
            "/lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio/virtio.ko",
            0o644,
            b"\x7fELF virtio",
        )
        .unwrap();
        w.file_bytes(
            "lib/modules/6.1.0-1-cloud-amd64/kernel/net/vsock.ko",
            0o644,
            b"odd len",
        )
        .unwrap();
        w.dir("/banger", 0o700).unwrap();
        w.file_bytes(MODULE_LIST_PATH, 0o644, b"a.ko\nb.ko\n")
            .unwrap();
        w.file_bytes("empty", 0o600, b"").unwrap();
        w.symlink("bin/sh", "busybox").unwrap();
        w.finish().unwrap()
    }

    fn cpio(args: &[&str], input: &[u8], dir: &Path) -> String {
        let mut child = Command::new("cpio")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("the cpio tool is needed for this test: apt-get install cpio");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "cpio {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    #[test]
    fn cpio_lists_exactly_the_entries_written_with_parents_first() {
        let dir = tempfile::tempdir().unwrap();
        let listing = cpio(&["-it", "--quiet"], &sample(), dir.path());
        let names: Vec<&str> = listing.lines().collect();
        assert_eq!(
            names,
            [
                "lib",
                "lib/modules",
                "lib/modules/6.1.0-1-cloud-amd64",
                "lib/modules/6.1.0-1-cloud-amd64/kernel",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio/virtio.ko",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/net",
                "lib/modules/6.1.0-1-cloud-amd64/kernel/net/vsock.ko",
                "banger",
                "banger/modules",
                "empty",
                "bin",
                "bin/sh",
            ]
        );
        let verbose = cpio(&["-itv", "--quiet"], &sample(), dir.path());
        let line = |name: &str| {
            verbose
                .lines()
                .find(|l| l.ends_with(&format!(" {name}")) || l.contains(&format!(" {name} -> ")))
                .unwrap_or_else(|| panic!("{name} not in {verbose}"))
                .to_string()
        };
        assert!(line("banger").starts_with("drwx------ "), "{verbose}");
        assert!(line("lib").starts_with("drwxr-xr-x "), "{verbose}");
        assert!(line("empty").starts_with("-rw------- "), "{verbose}");
        assert!(line("bin/sh").starts_with("lrwxrwxrwx "), "{verbose}");
        assert!(line("bin/sh").ends_with("bin/sh -> busybox"), "{verbose}");
        for l in verbose.lines() {
            let fields: Vec<&str> = l.split_whitespace().collect();
            assert_eq!((fields[2], fields[3]), ("root", "root"), "{l}");
            assert!(l.contains(" Jan  1  1970 "), "mtime is not 0: {l}");
        }
    }

    #[test]
    fn cpio_extracts_identical_bytes_and_modes() {
        let dir = tempfile::tempdir().unwrap();
        cpio(&["-idm", "--quiet"], &sample(), dir.path());
        let p = |s: &str| dir.path().join(s);
        assert_eq!(
            std::fs::read(p(
                "lib/modules/6.1.0-1-cloud-amd64/kernel/drivers/virtio/virtio.ko"
            ))
            .unwrap(),
            b"\x7fELF virtio"
        );
        assert_eq!(
            std::fs::read(p("lib/modules/6.1.0-1-cloud-amd64/kernel/net/vsock.ko")).unwrap(),
            b"odd len"
        );
        assert_eq!(std::fs::read(p("banger/modules")).unwrap(), b"a.ko\nb.ko\n");
        assert_eq!(std::fs::read(p("empty")).unwrap(), b"");
        assert_eq!(
            std::fs::read_link(p("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        let mode = |s: &str| std::fs::metadata(p(s)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode("banger"), 0o700);
        assert_eq!(mode("empty"), 0o600);
    }

    #[test]
    fn archives_are_reproducible_and_four_byte_aligned() {
        let a = sample();
        assert_eq!(a, sample());
        assert_eq!(a.len() % 4, 0);
        assert!(a.starts_with(b"070701"));
    }

    /// Unpacks concatenated archives the way the kernel does (`init/initramfs.c`): after a
    /// trailer, zero padding is skipped and the next archive starts at a 4-byte boundary.
    /// Returns (name, mode, data) per entry.
    fn kernel_unpack(mut buf: &[u8]) -> Vec<(String, u32, Vec<u8>)> {
        let mut out = Vec::new();
        let mut offset = 0usize;
        while !buf.is_empty() {
            if buf[0] == 0 {
                buf = &buf[1..];
                offset += 1;
                continue;
            }
            assert_eq!(offset % 4, 0, "archive does not start 4-byte aligned");
            assert!(buf.starts_with(b"070701"));
            let field = |i: usize| {
                u32::from_str_radix(
                    std::str::from_utf8(&buf[6 + 8 * i..14 + 8 * i]).unwrap(),
                    16,
                )
                .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let name =
                String::from_utf8(buf[HEADER_LEN..HEADER_LEN + namesize - 1].to_vec()).unwrap();
            let data_at = HEADER_LEN + namesize + pad_len(HEADER_LEN + namesize);
            let data = buf[data_at..data_at + size].to_vec();
            let next = data_at + size + pad_len(size);
            buf = &buf[next..];
            offset += next;
            if name != TRAILER {
                out.push((name, mode, data));
            }
        }
        out
    }

    #[test]
    fn two_concatenated_archives_unpack_as_one() {
        let dir = tempfile::tempdir().unwrap();
        let agent = dir.path().join("agent");
        std::fs::write(&agent, b"#!agent binary").unwrap();
        let mut both = sample();
        let first_len = both.len();
        agent_archive(&agent, br#"{"env":["A=1"]}"#, &mut both).unwrap();
        let entries = kernel_unpack(&both);
        let get = |n: &str| {
            entries
                .iter()
                .find(|e| e.0 == n)
                .unwrap_or_else(|| panic!("{n} missing"))
        };
        assert_eq!(get("init").2, b"#!agent binary");
        assert_eq!(get("init").1, S_IFREG | 0o755);
        assert_eq!(get("banger/image.json").2, br#"{"env":["A=1"]}"#);
        assert_eq!(get("banger/image.json").1, S_IFREG | 0o644);
        assert_eq!(get("banger/modules").2, b"a.ko\nb.ko\n");
        // The second archive on its own is what GNU cpio sees too.
        let listing = cpio(&["-it", "--quiet"], &both[first_len..], dir.path());
        assert_eq!(listing, "init\nbanger\nbanger/image.json\n");
    }

    #[test]
    fn hostile_or_odd_names_and_short_sources_are_refused() {
        let mut w = CpioWriter::new(Vec::new());
        for bad in ["", "/", "a/../b", "./a", "a//b", "a/", "..", "a\0b"] {
            let err = w.file_bytes(bad, 0o644, b"x").unwrap_err();
            assert_eq!(err.kind(), io::ErrorKind::InvalidInput, "{bad:?}");
        }
        assert!(w.symlink("l", "").is_err());
        let err = w.file("short", 0o644, 10, &mut &b"abc"[..]).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert!(err.to_string().contains("short"), "{err}");
    }
}
