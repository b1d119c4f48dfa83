//! The merged tree + staged content -> an ext4 image, without root and without a mount.
//!
//! Owns sizing the file system from the tree, `mkfs.ext4` of an empty sparse image, and one
//! `debugfs -w -f SCRIPT IMAGE` run that creates every directory, file, symlink, device node and
//! hard link with its owner, mode, times and xattrs. Leaves the tree's meaning to `oci::tree` and
//! the staging directory to `oci::flatten`.
//!
//! # The script (checked against e2fsprogs 1.47.0: debugfs/debugfs.c, misc/create_inode.c,
//! # lib/ss/parse.c, lib/ss/execute_cmd.c)
//! - debugfs reads it with `fgets` into a `BUFSIZ` (8192) buffer: a longer line would be split and
//!   its tail run as a command of its own, so every line is at most [`MAX_LINE`] bytes or the
//!   build is refused. Lines never start with `#` (a comment) or `!` (a shell escape).
//! - Every argument taken from the image is quoted: `"` + the bytes with `"` doubled + `"`.
//!   Inside quotes `ss_parse` keeps everything (spaces, tabs, `;`, `#`, backslashes, non-UTF-8)
//!   except NUL, CR and LF, which the tar boundary already refused. Quoting is checked by writing
//!   hostile names and reading them back.
//! - Names are passed as bare names in the current directory to `mkdir`, `write`, `symlink` and
//!   `mknod` (which take them literally), and as `./NAME` where debugfs resolves a path
//!   (`sif`, `ea_set`, `ln`, `cd`): that keeps `<12>` from meaning inode 12 and `-x` from being
//!   read as an option by `ea_set`'s getopt. `ea_set`'s last argument, the attribute name, is
//!   the one taken bare: getopt permutes, so a name starting with `-` would be read as an
//!   option. Names come only from the namespaces the tar boundary keeps (`user.`, `trusted.`,
//!   `security.`, `system.posix_acl_*`), and the writer refuses a `-` anyway.
//! - The only host paths in the script are files of the staging directory: the staged contents
//!   (`write`) and xattr values (`ea_set -f`).
//! - `write` gives the new inode the host file's permission bits (staged files are 0600) and uid
//!   and gid 0; `mknod` gives permissions 0. `sif` fixes mode, uid and gid where they differ.
//! - Times come from `set_current_time`, which `mkdir`, `write`, `symlink` and `mknod` use for
//!   atime, ctime and mtime (adding entries does not touch a directory's times). It is emitted
//!   only when the time changes, and only for times in `1..2^31`, which every e2fsprogs stores
//!   as given. Time 0 means "now" to `set_current_time`, and from e2fsprogs 1.47.1 on a new
//!   inode's times are clamped to `i32` (`ext2fs_inode_xtime_set`), so neither 0 (through 2^32
//!   truncating, which 1.47.0 did) nor times from 2^31 on can be made that way: those inodes
//!   get `sif mtime|atime|ctime @T`, which writes the low 32 bits and the epoch bits as given
//!   (`parse_time` in 1.47.0, `parse_ino_time` in 1.47.1 and later). The current time is reset
//!   to now at the end, so the superblock is not in the future.
//! - Hard links: the first name written is the inode; the others are `ln` of its absolute path,
//!   and `sif links_count` sets the count (`ln` does not). Entries are grouped per directory: one
//!   `cd ./NAME` in and one `cd ..` out.
//! - debugfs carries on after a failed command and exits 0, so its output is read: stdout may only
//!   hold the echoed commands and known progress lines, stderr only the version banner. What
//!   else it printed goes into the error with control characters escaped (it may quote names
//!   from the image).
//! - Memory: what the writer keeps besides the tree is bounded by the tree's size, never by
//!   path lengths: directories still to enter and inodes with several names are kept as (node,
//!   name) pairs, and a path is spelled out only for the directory being written and for each
//!   `ln` (from each directory's parent, recorded as it is entered).
//! - xattr values are staged in files because `ea_set` has no quoting for binary values; it
//!   reads at most one block (4096 bytes) from the file, so longer values are refused.

use super::flatten::{Limits, Staging};
use super::tar::{show, Device, Name, Xattr};
use super::tree::{Dir, InodeId, InodeKind, NodeId, NodeRef, Tree, ROOT};
use crate::ext4::size_for_tree;
use crate::hosttools::{require_tool, MissingTool};
use crate::progress::Progress;
use banger_hint::Hint;
use std::borrow::Cow;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufRead, BufReader, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Longest script line debugfs reads whole: `fgets` into 8192 bytes keeps 8191 characters, the
/// last of which must be the newline.
pub const MAX_LINE: usize = 8190;
/// ext4 label of OCI root file systems (the same as built images').
pub const LABEL: &str = "banger-root";
/// Largest xattr value `ea_set -f` reads (one 4 KiB block).
pub const MAX_XATTR_VALUE: usize = 4096;
/// Problems kept from debugfs's output.
const MAX_PROBLEMS: usize = 20;
const BLOCK: u64 = 4096;
/// Times from here on need the ext4 epoch bits, which only `sif` sets.
const TIME_32: i64 = 1 << 31;

/// Whether time `t` must be set with `sif` (see the module header): `set_current_time` takes 0
/// as "now", and e2fsprogs 1.47.1 and later clamp what it sets to `i32`.
fn needs_sif(t: i64) -> bool {
    t == 0 || t >= TIME_32
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFIFO: u32 = 0o010_000;

#[derive(Debug, thiserror::Error)]
pub enum Ext4BuildError {
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(
        "the staging path {0} contains a newline or carriage return, which debugfs cannot read"
    )]
    BadStagingPath(PathBuf),
    #[error("entry `{path}` cannot be written: its debugfs command would be {len} bytes, above debugfs's line limit of {MAX_LINE}")]
    LineTooLong { path: String, len: usize },
    #[error("extended attribute `{name}` of `{path}` has a {len}-byte value; ext4 stores at most {MAX_XATTR_VALUE} bytes per value")]
    XattrTooLarge {
        path: String,
        name: String,
        len: usize,
    },
    #[error("extended attribute `{name}` of `{path}` starts with `-`, which debugfs's `ea_set` would read as an option")]
    BadXattrName { path: String, name: String },
    #[error("mkfs.ext4 of {image} failed ({status}): {output}")]
    Mkfs {
        image: PathBuf,
        status: String,
        output: String,
    },
    #[error("debugfs could not build {image} ({status}): {}", problems.join("; "))]
    Debugfs {
        image: PathBuf,
        status: String,
        problems: Vec<String>,
    },
}

impl Hint for Ext4BuildError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            // Transparent: the missing tool is not in the chain, so its hint is asked here.
            Ext4BuildError::MissingTool(e) => e.hint(),
            // What to do about the others depends on what was being built: the caller says it.
            _ => None,
        }
    }
}

impl Ext4BuildError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Ext4BuildError::Io { what, source }
    }

    /// True when the file system ran out of blocks or inodes (the size estimate was short).
    pub fn is_out_of_space(&self) -> bool {
        match self {
            Ext4BuildError::Debugfs { problems, .. } => problems.iter().any(|p| {
                p.contains("Could not allocate")
                    || p.contains("No free space")
                    || p.contains("No space left")
            }),
            _ => false,
        }
    }
}

/// `"` + bytes with `"` doubled + `"`: one argument for debugfs's `ss_parse`.
pub fn quote(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len() + 2);
    out.push(b'"');
    for &b in bytes {
        if b == b'"' {
            out.push(b'"');
        }
        out.push(b);
    }
    out.push(b'"');
    out
}

fn dot_slash(name: &[u8]) -> Vec<u8> {
    quote(&[b"./", name].concat())
}

/// Writes the debugfs script.
struct Script<'a, 't> {
    out: BufWriter<File>,
    lines: u64,
    /// The time `set_current_time` last set (`None`: the real time).
    now: Option<i64>,
    staging: &'a Staging,
    empty_file: Option<Vec<u8>>,
    xattr_files: HashMap<Box<[u8]>, Vec<u8>>,
    /// Inodes with several names, once written: the directory and name of the first.
    written: HashMap<InodeId, (NodeId, &'t Name)>,
    /// Parent and name of every directory, recorded as its parent is written (for `ln`).
    parents: HashMap<NodeId, (NodeId, &'t Name)>,
    notices: Vec<String>,
}

impl<'t> Script<'_, 't> {
    /// The absolute path of `dir/name`, from the recorded parents.
    fn path_of(&self, mut dir: NodeId, name: &Name) -> Vec<u8> {
        let mut names = vec![name];
        while let Some(&(parent, n)) = self.parents.get(&dir) {
            names.push(n);
            dir = parent;
        }
        let mut out = Vec::new();
        for n in names.iter().rev() {
            out.push(b'/');
            out.extend_from_slice(n.as_bytes());
        }
        out
    }

    /// One command; `path` names the entry in an error.
    fn line(&mut self, args: &[&[u8]], path: &[u8]) -> Result<(), Ext4BuildError> {
        let len = args.iter().map(|a| a.len() + 1).sum::<usize>() - 1;
        if len > MAX_LINE {
            return Err(Ext4BuildError::LineTooLong {
                path: show(path),
                len,
            });
        }
        let write = |out: &mut BufWriter<File>| -> io::Result<()> {
            for (i, a) in args.iter().enumerate() {
                if i > 0 {
                    out.write_all(b" ")?;
                }
                out.write_all(a)?;
            }
            out.write_all(b"\n")
        };
        write(&mut self.out).map_err(Ext4BuildError::io("cannot write the debugfs script"))?;
        self.lines += 1;
        Ok(())
    }

    /// Makes the next created inode get time `t`, unless only `sif` can set it.
    fn time(&mut self, t: i64) -> Result<(), Ext4BuildError> {
        if needs_sif(t) || self.now == Some(t) {
            return Ok(());
        }
        self.line(&[b"set_current_time", format!("@{t}").as_bytes()], b"")?;
        self.now = Some(t);
        Ok(())
    }

    fn sif(
        &mut self,
        target: &[u8],
        field: &str,
        value: &str,
        path: &[u8],
    ) -> Result<(), Ext4BuildError> {
        self.line(&[b"sif", target, field.as_bytes(), value.as_bytes()], path)
    }

    /// Owner, mode (when not `default_mode`), late times and xattrs of the inode at `target`.
    #[allow(clippy::too_many_arguments)]
    fn finish_inode(
        &mut self,
        target: &[u8],
        full_mode: Option<u32>,
        default_mode: u32,
        meta: &super::tar::Meta,
        xattrs: &[Xattr],
        path: &[u8],
    ) -> Result<(), Ext4BuildError> {
        if let Some(mode) = full_mode {
            if mode != default_mode {
                self.sif(target, "mode", &format!("0{mode:o}"), path)?;
            }
        }
        if meta.uid != 0 {
            self.sif(target, "uid", &meta.uid.to_string(), path)?;
        }
        if meta.gid != 0 {
            self.sif(target, "gid", &meta.gid.to_string(), path)?;
        }
        if needs_sif(meta.mtime) {
            let t = format!("@{}", meta.mtime);
            for field in ["mtime", "atime", "ctime"] {
                self.sif(target, field, &t, path)?;
            }
        }
        for x in xattrs {
            self.xattr(target, x, path)?;
        }
        Ok(())
    }

    fn xattr(&mut self, target: &[u8], x: &Xattr, path: &[u8]) -> Result<(), Ext4BuildError> {
        // The name is `ea_set`'s only bare argument, and its getopt permutes: a leading `-`
        // would be taken as an option. The tar boundary keeps only names in namespaces that
        // cannot start with one; this keeps the script safe whatever changes there.
        if x.name.starts_with(b"-") {
            return Err(Ext4BuildError::BadXattrName {
                path: show(path),
                name: show(&x.name),
            });
        }
        if x.value.len() > MAX_XATTR_VALUE {
            return Err(Ext4BuildError::XattrTooLarge {
                path: show(path),
                name: show(&x.name),
                len: x.value.len(),
            });
        }
        let file = match self.xattr_files.get(&x.value) {
            Some(f) => f.clone(),
            None => {
                let (id, mut f) = self
                    .staging
                    .create()
                    .map_err(Ext4BuildError::io("cannot stage an xattr value"))?;
                f.write_all(&x.value)
                    .map_err(Ext4BuildError::io("cannot stage an xattr value"))?;
                let q = quote(self.staging.path(id).as_os_str().as_bytes());
                self.xattr_files.insert(x.value.clone(), q.clone());
                q
            }
        };
        self.line(&[b"ea_set", b"-f", &file, target, &quote(&x.name)], path)
    }

    fn empty_file(&mut self) -> Result<Vec<u8>, Ext4BuildError> {
        if let Some(f) = &self.empty_file {
            return Ok(f.clone());
        }
        let (id, _) = self
            .staging
            .create()
            .map_err(Ext4BuildError::io("cannot stage an empty file"))?;
        let q = quote(self.staging.path(id).as_os_str().as_bytes());
        self.empty_file = Some(q.clone());
        Ok(q)
    }

    /// Creates the entries of one directory (the current one) and says which subdirectories
    /// to enter next, last first.
    fn dir_contents(
        &mut self,
        tree: &'t Tree,
        dir_id: NodeId,
        dir: &'t Dir,
        dir_path: &[u8],
    ) -> Result<Vec<(NodeId, &'t Name)>, Ext4BuildError> {
        let mut subdirs = Vec::new();
        for (entry, &child) in &dir.children {
            let name = entry.as_bytes();
            let path = [dir_path, b"/", name].concat();
            let at_root = dir_path.is_empty();
            match tree.node(child) {
                Some(NodeRef::Dir(d)) => {
                    let target = dot_slash(name);
                    // What the directory is born with: mkdir makes 0755, mkfs's lost+found 0700.
                    let default_mode = if at_root && name == b"lost+found" {
                        // mkfs made it; give it the image's metadata.
                        self.root_like_times(&target, d.meta.mtime, &path)?;
                        S_IFDIR | 0o700
                    } else {
                        self.time(d.meta.mtime)?;
                        self.line(&[b"mkdir", &quote(name)], &path)?;
                        S_IFDIR | 0o755
                    };
                    self.finish_inode(
                        &target,
                        Some(S_IFDIR | d.meta.mode),
                        default_mode,
                        &d.meta,
                        &d.xattrs,
                        &path,
                    )?;
                    self.parents.insert(child, (dir_id, entry));
                    subdirs.push((child, entry));
                }
                Some(NodeRef::Leaf(ino, inode)) => {
                    if at_root && name == b"lost+found" {
                        self.notices.push(
                            "dropped the image's `/lost+found`, which is not a directory: ext4 needs that name for its own directory".into(),
                        );
                        continue;
                    }
                    if let Some(&(primary_dir, primary_name)) = self.written.get(&ino) {
                        let primary = quote(&self.path_of(primary_dir, primary_name));
                        self.line(&[b"ln", &primary, &dot_slash(name)], &path)?;
                        continue;
                    }
                    let m = &inode.meta;
                    self.time(m.mtime)?;
                    let q = quote(name);
                    let (full_mode, default_mode) = match &inode.kind {
                        InodeKind::File(c) => {
                            let src = match c {
                                super::tar::Content::Empty => self.empty_file()?,
                                super::tar::Content::Staged { id, .. } => {
                                    quote(self.staging.path(*id).as_os_str().as_bytes())
                                }
                            };
                            self.line(&[b"write", &src, &q], &path)?;
                            (Some(S_IFREG | m.mode), S_IFREG | 0o600)
                        }
                        InodeKind::Symlink(t) => {
                            self.line(&[b"symlink", &q, &quote(t)], &path)?;
                            // Symlink permissions are always 0777 on Linux.
                            (None, 0)
                        }
                        InodeKind::Char(d) => {
                            self.mknod(&q, b"c", *d, &path)?;
                            (Some(S_IFCHR | m.mode), S_IFCHR)
                        }
                        InodeKind::Block(d) => {
                            self.mknod(&q, b"b", *d, &path)?;
                            (Some(S_IFBLK | m.mode), S_IFBLK)
                        }
                        InodeKind::Fifo => {
                            self.line(&[b"mknod", &q, b"p"], &path)?;
                            (Some(S_IFIFO | m.mode), S_IFIFO)
                        }
                    };
                    let target = dot_slash(name);
                    if let InodeKind::Char(d) | InodeKind::Block(d) = &inode.kind {
                        if d.major > 0xffff || d.minor > 0xffff {
                            // mknod takes 16-bit numbers; ext4's new encoding in i_block[1]
                            // holds Linux's 12-bit major and 20-bit minor.
                            let enc = (d.minor & 0xff) | (d.major << 8) | ((d.minor & !0xff) << 12);
                            self.sif(&target, "block[1]", &enc.to_string(), &path)?;
                        }
                    }
                    self.finish_inode(&target, full_mode, default_mode, m, &inode.xattrs, &path)?;
                    if inode.links > 1 {
                        self.sif(&target, "links_count", &inode.links.to_string(), &path)?;
                        self.written.insert(ino, (dir_id, entry));
                    }
                }
                None => {}
            }
        }
        subdirs.reverse();
        Ok(subdirs)
    }

    fn mknod(
        &mut self,
        q: &[u8],
        kind: &[u8],
        d: Device,
        path: &[u8],
    ) -> Result<(), Ext4BuildError> {
        let (major, minor) = if d.major > 0xffff || d.minor > 0xffff {
            (0, 0)
        } else {
            (d.major, d.minor)
        };
        self.line(
            &[
                b"mknod",
                q,
                kind,
                major.to_string().as_bytes(),
                minor.to_string().as_bytes(),
            ],
            path,
        )
    }

    /// Times of an inode that already exists (the root, lost+found), unless `finish_inode`
    /// sets them.
    fn root_like_times(
        &mut self,
        target: &[u8],
        mtime: i64,
        path: &[u8],
    ) -> Result<(), Ext4BuildError> {
        if needs_sif(mtime) {
            return Ok(());
        }
        let t = format!("@{mtime}");
        for field in ["mtime", "atime", "ctime"] {
            self.sif(target, field, &t, path)?;
        }
        Ok(())
    }
}

/// What [`build`] made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ext4Output {
    /// Size of the image file (sparse).
    pub bytes: u64,
    pub commands: u64,
}

/// Sizes of the file system for `tree`: (bytes, inodes).
pub fn size_for(tree: &Tree, limits: &Limits) -> (u64, u64) {
    let s = tree.stats();
    let used = s.inodes + s.dirs + 16;
    // Room for what people install later, at mkfs's default of one inode per 16 KiB.
    let inodes = used + used / 10 + limits.ext4_headroom.bytes() / 16384;
    let content = s.blocks.saturating_mul(BLOCK) + inodes * 256;
    (size_for_tree(content, limits.ext4_headroom), inodes)
}

/// Builds `out` (which must not exist) from `tree`; on failure `out` is removed.
pub fn build(
    tree: &Tree,
    staging: &Staging,
    out: &Path,
    limits: &Limits,
    progress: &dyn Progress,
) -> Result<(Ext4Output, Vec<String>), Ext4BuildError> {
    let mkfs = require_tool("mkfs.ext4", "e2fsprogs")?;
    let debugfs = require_tool("debugfs", "e2fsprogs")?;
    if staging
        .dir()
        .as_os_str()
        .as_bytes()
        .iter()
        .any(|b| matches!(b, b'\n' | b'\r'))
    {
        return Err(Ext4BuildError::BadStagingPath(staging.dir().to_owned()));
    }
    // Created here, never opened if it exists: an existing file is not ours to replace.
    File::options()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(out)
        .map_err(Ext4BuildError::io(format!(
            "cannot create {}",
            out.display()
        )))?;
    let result = build_inner(tree, staging, out, limits, progress, &mkfs, &debugfs);
    if result.is_err() {
        // Best effort: the build error is what the caller needs.
        let _ = std::fs::remove_file(out);
    }
    result
}

fn build_inner(
    tree: &Tree,
    staging: &Staging,
    out: &Path,
    limits: &Limits,
    progress: &dyn Progress,
    mkfs: &Path,
    debugfs: &Path,
) -> Result<(Ext4Output, Vec<String>), Ext4BuildError> {
    let (script_id, script_file) = staging
        .create()
        .map_err(Ext4BuildError::io("cannot create the debugfs script"))?;
    let (commands, notices) = write_script(tree, staging, script_file)?;
    let script = staging.path(script_id);

    let (mut size, inodes) = size_for(tree, limits);
    let mut retried = false;
    loop {
        make_fs(mkfs, out, size, inodes)?;
        match run_debugfs(debugfs, &script, out, staging, commands, progress) {
            Err(e) if e.is_out_of_space() && !retried => {
                // The estimate was short; one generous retry, as the debootstrap build does.
                retried = true;
                size = size_for_tree(size.saturating_add(size / 2), crate::ext4::MiB(0));
                progress.log(&format!(
                    "file system too small, retrying with {size} bytes"
                ));
            }
            other => {
                other?;
                break;
            }
        }
    }
    Ok((
        Ext4Output {
            bytes: size,
            commands,
        },
        notices,
    ))
}

fn write_script(
    tree: &Tree,
    staging: &Staging,
    file: File,
) -> Result<(u64, Vec<String>), Ext4BuildError> {
    let mut s = Script {
        out: BufWriter::with_capacity(1 << 20, file),
        lines: 0,
        now: None,
        staging,
        empty_file: None,
        xattr_files: HashMap::new(),
        written: HashMap::new(),
        parents: HashMap::new(),
        notices: Vec::new(),
    };
    // The root exists already: only its metadata.
    let root = tree.root();
    let slash = quote(b"/");
    s.root_like_times(&slash, root.meta.mtime, b"/")?;
    s.finish_inode(
        &slash,
        Some(S_IFDIR | root.meta.mode),
        S_IFDIR | 0o755,
        &root.meta,
        &root.xattrs,
        b"/",
    )?;
    s.line(&[b"cd", &slash], b"/")?;
    struct Frame<'t> {
        path: Vec<u8>,
        subdirs: Vec<(NodeId, &'t Name)>,
    }
    let first = s.dir_contents(tree, ROOT, root, b"")?;
    let mut stack = vec![Frame {
        path: Vec::new(),
        subdirs: first,
    }];
    while let Some(top) = stack.last_mut() {
        match top.subdirs.pop() {
            Some((id, name)) => {
                let Some(NodeRef::Dir(d)) = tree.node(id) else {
                    continue;
                };
                let path = [top.path.as_slice(), b"/", name.as_bytes()].concat();
                s.line(&[b"cd", &dot_slash(name.as_bytes())], &path)?;
                let subdirs = s.dir_contents(tree, id, d, &path)?;
                stack.push(Frame { path, subdirs });
            }
            None => {
                let done = stack.pop().map(|f| f.path).unwrap_or_default();
                if !stack.is_empty() {
                    s.line(&[b"cd", b"\"..\""], &done)?;
                }
            }
        }
    }
    // Leave the superblock's times at the real time, not at the last entry's.
    s.line(&[b"set_current_time", b"now"], b"")?;
    s.out
        .flush()
        .map_err(Ext4BuildError::io("cannot write the debugfs script"))?;
    Ok((s.lines, s.notices))
}

fn make_fs(mkfs: &Path, out: &Path, size: u64, inodes: u64) -> Result<(), Ext4BuildError> {
    let f = File::options()
        .write(true)
        .open(out)
        .map_err(Ext4BuildError::io(format!("cannot open {}", out.display())))?;
    // Zero length first, so a retry starts from an empty (sparse) file.
    f.set_len(0)
        .and_then(|()| f.set_len(size))
        .map_err(Ext4BuildError::io(format!("cannot size {}", out.display())))?;
    drop(f);
    let output = Command::new(mkfs)
        .args(["-F", "-q", "-t", "ext4", "-b", "4096", "-m", "0"])
        .args(["-N", &inodes.to_string()])
        // Otherwise the root directory belongs to whoever runs mkfs.
        .args(["-E", "root_owner=0:0", "-L", LABEL])
        .arg(out)
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .output()
        .map_err(Ext4BuildError::io(format!("cannot run {}", mkfs.display())))?;
    if !output.status.success() {
        return Err(Ext4BuildError::Mkfs {
            image: out.to_owned(),
            status: output.status.to_string(),
            output: String::from_utf8_lossy(&[output.stdout, output.stderr].concat())
                .trim()
                .to_string(),
        });
    }
    Ok(())
}

/// What debugfs may print on stdout besides failures.
fn expected_stdout(line: &[u8]) -> bool {
    line.is_empty()
        || line.starts_with(b"debugfs: ")
        || line.starts_with(b"Allocated inode: ")
        || line.starts_with(b"Setting current time to ")
}

/// Reads what debugfs printed: how many commands it echoed, and every other line (at most
/// [`MAX_PROBLEMS`] from each stream), escaped: it may quote names from the image, which can
/// hold terminal escape sequences.
fn read_outputs(stdout: impl BufRead, stderr: &[u8]) -> io::Result<(u64, Vec<String>)> {
    let mut problems = Vec::new();
    let mut done = 0u64;
    for line in stdout.split(b'\n') {
        let line = line?;
        if line.starts_with(b"debugfs: ") {
            done += 1;
        } else if !expected_stdout(&line) && problems.len() < MAX_PROBLEMS {
            problems.push(show(&line));
        }
    }
    let mut lines = stderr.split(|&b| b == b'\n');
    // The first line is the version banner.
    if let Some(first) = lines.next() {
        if !first.starts_with(b"debugfs ") && !first.trim_ascii().is_empty() {
            problems.push(show(first));
        }
    }
    problems.extend(
        lines
            .filter(|l| !l.trim_ascii().is_empty())
            .take(MAX_PROBLEMS)
            .map(show),
    );
    Ok((done, problems))
}

fn run_debugfs(
    debugfs: &Path,
    script: &Path,
    image: &Path,
    staging: &Staging,
    commands: u64,
    progress: &dyn Progress,
) -> Result<(), Ext4BuildError> {
    // Both outputs go to files: debugfs writes stdout unbuffered, a line at a time, and a pipe
    // would cost a context switch per line (a third of the run time on 30,000 files).
    let output_file = |what: &str| {
        staging.create().map_err(Ext4BuildError::io(format!(
            "cannot create debugfs's {what} file"
        )))
    };
    let (stdout_id, stdout_file) = output_file("stdout")?;
    let (stderr_id, stderr_file) = output_file("stderr")?;
    let script_len = std::fs::metadata(script).map(|m| m.len()).unwrap_or(0);
    // What debugfs will echo: `debugfs: ` + each line, plus a short line per created inode.
    let expected = script_len + commands * (9 + 24);
    let mut child = Command::new(debugfs)
        .arg("-w")
        .arg("-f")
        .arg(script)
        .arg(image)
        .env_clear()
        .env("LC_ALL", "C")
        .stdin(Stdio::null())
        .stdout(stdout_file)
        .stderr(stderr_file)
        .spawn()
        .map_err(Ext4BuildError::io(format!(
            "cannot run {}",
            debugfs.display()
        )))?;
    let stdout_path = staging.path(stdout_id);
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) => {
                let done = std::fs::metadata(&stdout_path).map_or(0, |m| m.len());
                progress.bytes(done.min(expected), Some(expected));
                std::thread::sleep(std::time::Duration::from_millis(200));
            }
            Err(e) => {
                // Never leave the child behind.
                let _ = child.kill();
                let _ = child.wait();
                return Err(Ext4BuildError::io("cannot wait for debugfs")(e));
            }
        }
    };
    progress.bytes(expected, Some(expected));

    let mut stderr = Vec::new();
    File::open(staging.path(stderr_id))
        .and_then(|f| f.take(1 << 20).read_to_end(&mut stderr))
        .map_err(Ext4BuildError::io("cannot read debugfs's stderr file"))?;
    let stdout =
        File::open(&stdout_path).map_err(Ext4BuildError::io("cannot read debugfs's output"))?;
    let (done, mut problems) = read_outputs(BufReader::with_capacity(1 << 16, stdout), &stderr)
        .map_err(Ext4BuildError::io("cannot read debugfs's output"))?;
    if !status.success() || !problems.is_empty() || done != commands {
        if done != commands && problems.is_empty() {
            problems.push(format!("debugfs ran {done} of {commands} commands"));
        }
        return Err(Ext4BuildError::Debugfs {
            image: image.to_owned(),
            status: status.to_string(),
            problems,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::flatten::Limits;
    use crate::oci::tar::{normalise, Content, Entry, EntryKind, ImagePath, Meta};

    fn p(s: &str) -> ImagePath {
        normalise(s.as_bytes(), &Limits::default()).unwrap()
    }

    fn entry(path: &str, kind: EntryKind, mtime: i64) -> Entry {
        Entry {
            path: p(path),
            kind,
            meta: Meta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime,
            },
            xattrs: vec![],
        }
    }

    /// The script for `tree`, as text.
    fn script(tree: &Tree) -> String {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(&dir.path().join("staging")).unwrap();
        let (id, file) = staging.create().unwrap();
        write_script(tree, &staging, file).unwrap();
        String::from_utf8(std::fs::read(staging.path(id)).unwrap()).unwrap()
    }

    #[test]
    fn times_never_depend_on_how_e2fsprogs_stores_what_set_current_time_sets() {
        let mut tree = Tree::new(&Limits::default());
        for (name, t) in [
            ("zero", 0),
            ("one", 1),
            ("y2038", 1 << 31),
            ("now", 1_700_000_000),
        ] {
            tree.apply(0, entry(name, EntryKind::File(Content::Empty), t))
                .unwrap();
            tree.apply(0, entry(&format!("{name}.d"), EntryKind::Dir, t))
                .unwrap();
        }
        let text = script(&tree);
        // `set_current_time` only with times every e2fsprogs stores as given (0 means "now";
        // 1.47.1 and later clamp to i32, 1.47.0 truncated 2^32 to 0).
        for line in text.lines().filter(|l| l.starts_with("set_current_time")) {
            let arg = line.split(' ').nth(1).unwrap();
            if arg != "now" {
                let t: i64 = arg.strip_prefix('@').unwrap().parse().unwrap();
                assert!((1..1 << 31).contains(&t), "{line}");
            }
        }
        for name in ["zero", "zero.d"] {
            for field in ["mtime", "atime", "ctime"] {
                let want = format!("sif \"./{name}\" {field} @0");
                assert!(text.lines().any(|l| l == want), "no `{want}` in\n{text}");
            }
        }
        assert!(text.contains("sif \"./y2038\" mtime @2147483648"), "{text}");
        assert!(!text.contains("sif \"./one\" mtime"), "{text}");
        // The root is set once.
        assert_eq!(text.matches("sif \"/\" mtime").count(), 1, "{text}");
    }

    #[test]
    fn an_xattr_name_starting_with_a_dash_is_never_written() {
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(&dir.path().join("staging")).unwrap();
        let (_, file) = staging.create().unwrap();
        let mut s = Script {
            out: BufWriter::new(file),
            lines: 0,
            now: None,
            staging: &staging,
            empty_file: None,
            xattr_files: HashMap::new(),
            written: HashMap::new(),
            parents: HashMap::new(),
            notices: Vec::new(),
        };
        let x = Xattr {
            name: b"-f/etc/shadow"[..].into(),
            value: b"v"[..].into(),
        };
        let err = s.xattr(b"\"./f\"", &x, b"/f").unwrap_err();
        assert!(matches!(err, Ext4BuildError::BadXattrName { .. }), "{err}");
        assert_eq!(s.lines, 0);
    }

    #[test]
    fn debugfs_output_in_errors_has_control_characters_escaped() {
        let stdout = b"debugfs: mkdir \"x\"\n\x1b]0;owned\x07mkdir: Could not allocate\n";
        let stderr = b"debugfs 1.47.0 (5-Feb-2023)\n\"./\x1b[2Jname\": File not found\n";
        let (done, problems) = read_outputs(&stdout[..], stderr).unwrap();
        assert_eq!(done, 1);
        assert_eq!(problems.len(), 2, "{problems:?}");
        for p in &problems {
            assert!(!p.chars().any(char::is_control), "{p:?}");
        }
        assert!(problems[0].contains("\\u{1b}]0;owned\\u{7}mkdir: Could not allocate"));
        assert!(problems[1].contains("\\u{1b}[2Jname"), "{problems:?}");
    }

    /// Set in the child process of the memory test.
    const MEMORY_CHILD: &str = "BANGER_EXT4_MEMORY_CHILD";

    /// (current, peak) resident memory of this process, in KiB.
    fn rss_kib() -> (u64, u64) {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let field = |name: &str| -> u64 {
            let line = status.lines().find(|l| l.starts_with(name)).unwrap();
            line.split_whitespace().nth(1).unwrap().parse().unwrap()
        };
        (field("VmRSS:"), field("VmHWM:"))
    }

    #[test]
    fn the_script_writer_keeps_no_path_per_directory_or_hardlink() {
        let name = "oci::ext4::tests::the_script_writer_keeps_no_path_per_directory_or_hardlink";
        if std::env::var_os(MEMORY_CHILD).is_none() {
            // Peak memory is per process, and the other tests share this one: run alone.
            let out = Command::new(std::env::current_exe().unwrap())
                .args(["--exact", name, "--nocapture", "--test-threads=1"])
                .env(MEMORY_CHILD, "1")
                .output()
                .unwrap();
            let stdout = String::from_utf8_lossy(&out.stdout);
            let extra: u64 = stdout
                .split_once("SCRIPT-EXTRA-KIB ")
                .and_then(|(_, r)| r.split_whitespace().next())
                .unwrap_or_else(|| panic!("{stdout}\n{}", String::from_utf8_lossy(&out.stderr)))
                .parse()
                .unwrap();
            eprintln!("the script writer's peak: {} MiB", extra >> 10);
            assert!(extra < 32 << 10, "the script writer held {extra} KiB");
            return;
        }
        // A directory 3,765 bytes deep, reached through a short symlink, with 20,000
        // subdirectories and 20,000 files, each also hardlinked from a later directory: keeping a path
        // per directory still to enter and per hardlinked inode would hold about 150 MB.
        const N: u64 = 20_000;
        let deep = vec!["x".repeat(250); 15].join("/");
        let mut tree = Tree::new(&Limits::default());
        let link = EntryKind::Symlink(format!("/{deep}").into_bytes().into());
        tree.apply(0, entry("l", link, 1)).unwrap();
        for i in 0..N {
            tree.apply(0, entry(&format!("l/d{i}"), EntryKind::Dir, 1))
                .unwrap();
            let file = EntryKind::File(Content::Empty);
            tree.apply(0, entry(&format!("l/f{i}"), file, 1)).unwrap();
            let hard = EntryKind::Hardlink(p(&format!("l/f{i}")));
            tree.apply(0, entry(&format!("z/{i}"), hard, 1)).unwrap();
        }
        let dir = tempfile::tempdir().unwrap();
        let staging = Staging::open(&dir.path().join("staging")).unwrap();
        let (id, file) = staging.create().unwrap();
        let (before, _) = rss_kib();
        write_script(&tree, &staging, file).unwrap();
        let (_, peak) = rss_kib();
        let text = std::fs::read(staging.path(id)).unwrap();
        let lns = text
            .split(|&b| b == b'\n')
            .filter(|l| l.starts_with(b"ln "))
            .count();
        assert_eq!(lns as u64, N);
        println!("SCRIPT-EXTRA-KIB {}", peak.saturating_sub(before));
    }
}
