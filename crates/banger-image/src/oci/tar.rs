//! The untrusted boundary: one layer's uncompressed tar stream -> validated, normalised entries.
//!
//! Owns: reading tar headers (ustar, GNU and PAX), deciding where each entry's data starts and
//! ends, normalising names, classifying whiteouts, checking every limit, and handing regular-file
//! data to a [`Stager`] as it streams past. Leaves to `oci::tree` what the entries mean together
//! (whiteouts, links, symlinked parents) and to the stager where the bytes go.
//!
//! # Why not the `tar` crate's reader
//! Layers are read by several tar implementations (GNU tar in people's hands, Go's archive/tar in
//! containerd and Docker), and an archive they read differently can show a reviewer one tree and
//! a runtime another. The `tar` crate's reader (0.4.46) disagrees with both on some inputs: it
//! skips `size` bytes after directory, symlink and hardlink headers (GNU skips none after
//! directories and hardlinks, Go none after any header-only type), ignores PAX global headers
//! (GNU applies them to every later entry) and accepts only the unsigned header checksum. So this
//! module reads the 512-byte blocks itself, follows GNU tar where GNU and Go agree, and refuses the
//! inputs where they do not. The `tar` crate builds the test archives.
//!
//! # Rules (each refusal is a [`TarError`] naming the entry and its byte offset)
//! - Sizes: a PAX `size` overrides the header's, as in GNU tar. Regular files carry `size` bytes
//!   of data. Directories carry none whatever their size field says (GNU and Go agree). Hardlinks
//!   ignore the header's size field (GNU and Go agree) but a non-zero PAX size is refused (GNU
//!   would skip that much, Go none). Symlinks, devices and FIFOs with a non-zero size are refused
//!   (GNU skips the data, Go does not). A `\0`-type entry whose name ends in `/` is a directory
//!   (GNU and Go agree) and must have size 0; a `0`-type one is refused (GNU reads a directory, Go
//!   a file).
//! - Numbers: octal with optional leading spaces and trailing NULs/spaces, or base-256 (`0x80`;
//!   `0xff` negative, mtime only). Anything else is refused. Checksums may be signed or unsigned.
//! - Extension headers: one PAX `x`, one GNU `L` and one `K` at most per entry, each at most
//!   [`Limits::max_extension`] bytes. A GNU long name and a PAX path that differ are refused (GNU
//!   takes the PAX one, Go the long name); likewise long links. PAX global headers may only carry
//!   `comment`, since GNU applies the rest to all later entries and Go ignores them.
//! - End: a zero block ends the archive if EOF or a second zero block follows; a zero block
//!   followed by anything else is refused (GNU stops, Go fails). Data after the two zero blocks is
//!   not parsed (the layer reader still hashes it for the diff_id).
//! - Types: regular, directory, symlink, hardlink, char and block devices, FIFO. GNU sparse files
//!   (`S`, `GNU.sparse.*`), contiguous files (`7`), volume/multivolume/dumpdir headers and unknown
//!   types are refused: no container image tool writes them.
//! - Names (entries and hardlink targets): a leading `/` and `.` components are dropped and `//`
//!   collapses (absolute names are neutralised into the image, as every runtime does); a `..`
//!   component is refused (no image builder writes one, and cleaning it lexically would differ
//!   from resolving it when a parent is a symlink). NUL, `\n` and `\r` are refused because the
//!   ext4 writer's command script is line based. Paths are at most [`Limits::max_path`] bytes,
//!   components [`Limits::max_name`], symlink targets [`Limits::max_link`] and never empty.
//! - Whiteouts: `.wh..wh..opq` marks its directory opaque; other `.wh..wh.*` names (AUFS
//!   bookkeeping) are skipped with a notice, as containerd does; a bare `.wh.` is refused; a
//!   whiteout name used as a parent directory is refused. Whiteout data is discarded.
//! - Owners: numeric uid/gid (names are ignored, as by container runtimes), at most 2^32-2.
//!   Modes keep the permission, setuid, setgid and sticky bits. Times before 1970 become 0 and
//!   times after what ext4 stores are clamped.
//! - Xattrs: `SCHILY.xattr.NAME` (GNU, Go) and `LIBARCHIVE.xattr.NAME` (bsdtar: URL-encoded name,
//!   base64 value); SCHILY wins when both name the same attribute. At most
//!   [`Limits::max_xattrs`] per entry and [`Limits::max_xattr_value`] bytes each (4096, what
//!   ext4 stores), and together they must fit the one 4 KiB block ext4 keeps them in
//!   ([`XATTR_BLOCK_SPACE`]): refused here, naming the entry, rather than held until the ext4
//!   writer finds out. Names outside the namespaces ext4 stores (`user.`, `trusted.`,
//!   `security.`, POSIX ACLs) are dropped with a notice; names GNU tar would decode (`%25`,
//!   `%3D`) are refused.
//! - Memory: every entry's path, link target and xattrs, plus [`ENTRY_MEMORY`] for what merging
//!   it costs, count against the image's [`Limits::max_metadata`] ([`ImageCounts`] is shared by
//!   its layers' readers), so a layer of small compressed headers cannot make the merge hold
//!   gigabytes of names and attributes. A reader holds one entry at a time, plus at most one
//!   extension header.

use super::flatten::Limits;
use std::fmt;
use std::io::{self, Read};
use std::sync::atomic::{AtomicU64, Ordering};

/// Size of a tar block.
pub const BLOCK: usize = 512;
/// Largest mtime ext4 stores (34-bit seconds with the epoch bits): 2446-05-10.
pub const MAX_MTIME: i64 = (1 << 34) - (1 << 31) - 1;
/// At most this many notices are kept per layer; the rest are counted.
const MAX_NOTICES: usize = 20;

/// Shows untrusted bytes readably: UTF-8 where possible, control characters escaped.
pub fn show(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).escape_debug().to_string()
}

/// One path component: non-empty, no `/`, NUL, `\n` or `\r`, not `.` or `..`.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Name(Box<[u8]>);

impl Name {
    /// Checks `bytes` as one component (length limits are the caller's).
    pub fn new(bytes: &[u8]) -> Option<Self> {
        let ok = !bytes.is_empty()
            && bytes != b"."
            && bytes != b".."
            && !bytes.iter().any(|b| matches!(b, b'/' | 0 | b'\n' | b'\r'));
        ok.then(|| Self(bytes.into()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\"", show(&self.0))
    }
}

/// A normalised path inside the image, as components from its root; empty is the root.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ImagePath(Vec<Name>);

impl ImagePath {
    pub fn root() -> Self {
        Self(Vec::new())
    }

    pub fn from_names(names: Vec<Name>) -> Self {
        Self(names)
    }

    pub fn components(&self) -> &[Name] {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The parent's components and the last name; `None` for the root.
    pub fn split_last(&self) -> Option<(&Name, &[Name])> {
        self.0.split_last()
    }

    /// Length of [`ImagePath::to_bytes`].
    pub fn byte_len(&self) -> usize {
        self.0
            .iter()
            .map(|n| n.as_bytes().len() + 1)
            .sum::<usize>()
            .max(1)
    }

    /// `/a/b` (the root is `/`).
    pub fn to_bytes(&self) -> Vec<u8> {
        if self.0.is_empty() {
            return b"/".to_vec();
        }
        let mut out = Vec::new();
        for n in &self.0 {
            out.push(b'/');
            out.extend_from_slice(n.as_bytes());
        }
        out
    }
}

impl fmt::Display for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&show(&self.to_bytes()))
    }
}

impl fmt::Debug for ImagePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// Owner, permissions and time of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits with setuid, setgid and sticky (`0o7777` at most).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the epoch, within `0..=MAX_MTIME`.
    pub mtime: i64,
}

/// One extended attribute (name validated, value at most the limit).
#[derive(Clone, PartialEq, Eq)]
pub struct Xattr {
    pub name: Box<[u8]>,
    pub value: Box<[u8]>,
}

impl fmt::Debug for Xattr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={} bytes", show(&self.name), self.value.len())
    }
}

/// Where a regular file's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Content {
    Empty,
    /// In the stager's file number `id`.
    Staged {
        id: u64,
        size: u64,
    },
}

impl Content {
    pub fn size(&self) -> u64 {
        match self {
            Content::Empty => 0,
            Content::Staged { size, .. } => *size,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    pub major: u32,
    pub minor: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File(Content),
    Dir,
    /// The raw target, never followed.
    Symlink(Box<[u8]>),
    /// Another name for the entry at this (normalised) path.
    Hardlink(ImagePath),
    Char(Device),
    Block(Device),
    Fifo,
    /// `.wh.NAME`: the entry's path is the hidden path `PARENT/NAME`.
    Whiteout,
    /// `.wh..wh..opq`: the entry's path is the opaque directory.
    Opaque,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub path: ImagePath,
    pub kind: EntryKind,
    pub meta: Meta,
    pub xattrs: Vec<Xattr>,
}

/// Receives regular-file data as it streams past.
pub trait Stager {
    /// Consumes `data` (exactly `size` bytes, `size > 0`) and says where it went.
    fn stage(&mut self, data: &mut dyn Read, size: u64) -> io::Result<Content>;
}

/// A stager that reads and drops everything (fuzzing, listing).
#[derive(Debug, Default)]
pub struct Discard;

impl Stager for Discard {
    fn stage(&mut self, data: &mut dyn Read, size: u64) -> io::Result<Content> {
        io::copy(data, &mut io::sink())?;
        Ok(Content::Staged { id: 0, size })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TarErrorKind {
    #[error("reading the layer failed: {0}")]
    Read(#[source] io::Error),
    #[error("the archive ends in the middle of an entry")]
    Truncated,
    #[error("header checksum mismatch (damaged, or not a tar archive)")]
    Checksum,
    #[error("invalid {field} field {raw:?}")]
    Number { field: &'static str, raw: String },
    #[error("data follows a single zero block (the end-of-archive marker); tar implementations disagree on whether it belongs to the archive")]
    AfterEnd,
    #[error("two {0} headers describe the same entry")]
    DuplicateExtension(&'static str),
    #[error(
        "the archive ends after an extension header (PAX or GNU long name) that describes no entry"
    )]
    DanglingExtension,
    #[error("extension header of {size} bytes exceeds the limit of {max}")]
    ExtensionTooLarge { size: u64, max: u64 },
    #[error("malformed PAX record: {0}")]
    Pax(String),
    #[error("PAX global header sets `{0}`, which GNU tar applies to every later entry and containerd ignores")]
    GlobalKeyword(String),
    #[error("GNU sparse, multi-volume and incremental entries are not supported (`{0}`)")]
    GnuExtension(String),
    #[error("unsupported entry type {0:?}")]
    UnsupportedType(char),
    #[error("has a data size of {size} bytes but its type carries no data; tar implementations disagree on where the next header starts")]
    HeaderOnlyWithData { size: u64 },
    #[error(
        "is a type `0` regular file whose name ends in `/`: GNU tar reads a directory, Go a file"
    )]
    AmbiguousTrailingSlash,
    #[error(
        "has a GNU long {0} and a PAX {0} that differ; tar implementations pick different ones"
    )]
    ConflictingNames(&'static str),
    #[error("has a header prefix longer than 130 bytes in a star-format header; tar implementations read different names")]
    AmbiguousPrefix,
    #[error("contains a `..` component")]
    DotDot,
    #[error(
        "contains a newline, carriage return or NUL byte, which cannot be written into the image"
    )]
    BadChar,
    #[error("path of {len} bytes exceeds the limit of {max}")]
    PathTooLong { len: usize, max: usize },
    #[error("has a component of {len} bytes, above the limit of {max}")]
    NameTooLong { len: usize, max: usize },
    #[error("link target of {len} bytes exceeds the limit of {max}")]
    LinkTooLong { len: usize, max: usize },
    #[error("symlink with an empty target")]
    EmptyLink,
    #[error("hardlink to the image root")]
    HardlinkToRoot,
    #[error("would replace the image root with a non-directory")]
    RootNotDir,
    #[error("is a whiteout (`.wh.`) that names nothing")]
    BareWhiteout,
    #[error("has a whiteout name (`.wh.`) as a parent directory")]
    WhiteoutParent,
    #[error("the image has more than {max} entries (limit)")]
    TooManyEntries { max: u64 },
    #[error("has more than {max} extended attributes (limit)")]
    TooManyXattrs { max: usize },
    #[error("has an extended attribute `{name}` with a {len}-byte value; ext4 stores at most {max} bytes per value")]
    XattrTooLarge {
        name: String,
        len: usize,
        max: usize,
    },
    #[error("has extended attributes that need {len} bytes; ext4 keeps an inode's attributes in one 4096-byte block, which holds {max}")]
    XattrsTooLarge { len: usize, max: usize },
    #[error("brings the image's metadata (entries, paths, link targets and extended attributes) above {max} bytes (limit)")]
    MetadataTooLarge { max: u64 },
    #[error("has an invalid extended attribute name `{0}`")]
    BadXattrName(String),
    #[error("has a malformed POSIX ACL in `{0}`")]
    BadAcl(String),
    #[error("{field} {value} is out of range")]
    OutOfRange { field: &'static str, value: i128 },
    #[error("cannot stage file content: {0}")]
    Stage(#[source] io::Error),
}

/// A refused layer tar: what, at which byte offset of the uncompressed stream, for which entry.
#[derive(Debug)]
pub struct TarError {
    pub offset: u64,
    pub entry: Option<String>,
    pub kind: TarErrorKind,
}

impl fmt::Display for TarError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.entry {
            Some(e) => write!(
                f,
                "entry `{e}` (header at byte {}) {}",
                self.offset, self.kind
            ),
            None => write!(f, "at byte {}: {}", self.offset, self.kind),
        }
    }
}

impl std::error::Error for TarError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match &self.kind {
            TarErrorKind::Read(e) | TarErrorKind::Stage(e) => Some(e),
            _ => None,
        }
    }
}

/// Parses a numeric header field (see the module rules); `None` if invalid.
fn number(field: &[u8], allow_negative: bool) -> Option<i128> {
    match field.first()? {
        0x80 => {
            let mut v: i128 = 0;
            for &b in &field[1..] {
                v = v.checked_mul(256)?.checked_add(i128::from(b))?;
            }
            Some(v)
        }
        0xff if allow_negative => {
            // Two's complement over the whole field.
            let mut v: i128 = -1;
            for &b in field {
                v = (v << 8) | i128::from(b);
            }
            Some(v)
        }
        _ => {
            if field.iter().all(|&b| b == 0) {
                return Some(0);
            }
            let start = field.iter().position(|&b| b != b' ')?;
            let digits = field[start..]
                .iter()
                .take_while(|b| (b'0'..=b'7').contains(b))
                .count();
            if digits == 0 {
                return None;
            }
            let rest = &field[start + digits..];
            if !rest.iter().all(|&b| b == 0 || b == b' ') {
                return None;
            }
            let mut v: i128 = 0;
            for &b in &field[start..start + digits] {
                v = v.checked_mul(8)?.checked_add(i128::from(b - b'0'))?;
            }
            Some(v)
        }
    }
}

fn cstr(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

/// Offsets of the ustar header fields.
mod field {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const CHKSUM: Range<usize> = 148..156;
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..263;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    pub const PREFIX: Range<usize> = 345..500;
    pub const STAR_TRAILER: Range<usize> = 508..512;
}

fn checksum_ok(block: &[u8; BLOCK]) -> bool {
    let Some(recorded) = number(&block[field::CHKSUM], false) else {
        return false;
    };
    let (mut unsigned, mut signed) = (0i128, 0i128);
    for (i, &b) in block.iter().enumerate() {
        let b = if field::CHKSUM.contains(&i) { b' ' } else { b };
        unsigned += i128::from(b);
        signed += i128::from(b as i8);
    }
    recorded == unsigned || recorded == signed
}

/// PAX records of one `x` header, already interpreted.
#[derive(Default)]
struct Pax {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    size: Option<u64>,
    uid: Option<u64>,
    gid: Option<u64>,
    mtime: Option<i128>,
    schily: Vec<(Vec<u8>, Vec<u8>)>,
    libarchive: Vec<(Vec<u8>, Vec<u8>)>,
    xattr_records: usize,
}

/// Bytes of an inode's extended attributes in ext4's attribute block: each entry is 16 bytes
/// plus its name, values are stored after them, both padded to 4 bytes (e2fsprogs
/// `EXT2_EXT_ATTR_LEN` and `EXT2_EXT_ATTR_SIZE`). Full names are counted, although ext4 stores
/// `user.`, `trusted.`, `security.` and the ACL names as a one-byte index: an upper bound.
pub fn xattr_space(xattrs: &[Xattr]) -> usize {
    xattrs
        .iter()
        .map(|x| (x.name.len() + 16).next_multiple_of(4) + x.value.len().next_multiple_of(4))
        .sum()
}

/// What one 4 KiB attribute block holds after its 32-byte header and 4-byte end marker. The
/// space left in a 256-byte inode is not counted, so whatever fits here fits in ext4.
pub const XATTR_BLOCK_SPACE: usize = 4096 - 32 - 4;

/// What merging one entry costs in memory besides its names and attributes (tree node, inode,
/// directory slot; measured at about 170 bytes on x86_64 with 1,000,000 entries): charged to
/// the metadata budget with each entry, so the budget bounds the merge's memory whatever the
/// mix of many small entries and few large ones.
pub const ENTRY_MEMORY: usize = 160;

/// What the layers of one image have used so far, shared by the readers of its layers.
#[derive(Debug, Default)]
pub struct ImageCounts {
    /// Tar entries.
    pub entries: AtomicU64,
    /// Bytes of paths, link targets and extended attributes the entries carry, plus
    /// [`ENTRY_MEMORY`] each: an upper bound of what the merge holds.
    pub metadata: AtomicU64,
}

/// One PAX record: keyword and value.
type Record<'a> = (&'a [u8], &'a [u8]);

/// Splits PAX data into records: `LEN KEY=VALUE\n`, LEN counting the whole record.
fn pax_records(data: &[u8]) -> Result<Vec<Record<'_>>, String> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let sp = rest
            .iter()
            .position(|&b| b == b' ')
            .ok_or("missing length")?;
        let len_txt = &rest[..sp];
        if len_txt.is_empty() || !len_txt.iter().all(u8::is_ascii_digit) {
            return Err(format!("bad length {:?}", show(len_txt)));
        }
        let len: usize = std::str::from_utf8(len_txt)
            .ok()
            .and_then(|s| s.parse().ok())
            .ok_or("length out of range")?;
        if len <= sp + 1 || len > rest.len() {
            return Err(format!("length {len} out of range"));
        }
        let record = &rest[sp + 1..len];
        let Some((&b'\n', body)) = record.split_last() else {
            return Err("missing newline".into());
        };
        let eq = body.iter().position(|&b| b == b'=').ok_or("missing `=`")?;
        let (key, value) = (&body[..eq], &body[eq + 1..]);
        if key.is_empty() || key.contains(&0) {
            return Err(format!("bad keyword {:?}", show(key)));
        }
        out.push((key, value));
        rest = &rest[len..];
    }
    Ok(out)
}

fn pax_decimal(key: &[u8], value: &[u8]) -> Result<u64, String> {
    if value.is_empty() || !value.iter().all(u8::is_ascii_digit) {
        return Err(format!("{}={:?} is not a number", show(key), show(value)));
    }
    std::str::from_utf8(value)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{}={} is out of range", show(key), show(value)))
}

/// `[-]SECONDS[.FRACTION]`, rounded down to whole seconds.
fn pax_time(key: &[u8], value: &[u8]) -> Result<i128, String> {
    let bad = || format!("{}={:?} is not a time", show(key), show(value));
    let (neg, body) = match value.split_first() {
        Some((b'-', b)) => (true, b),
        _ => (false, value),
    };
    let (secs, frac) = match body.iter().position(|&b| b == b'.') {
        Some(i) => (&body[..i], &body[i + 1..]),
        None => (body, &b""[..]),
    };
    if secs.is_empty() || !secs.iter().all(u8::is_ascii_digit) || secs.len() > 30 {
        return Err(bad());
    }
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let s: i128 = std::str::from_utf8(secs)
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let has_frac = frac.iter().any(|&b| b != b'0');
    Ok(match (neg, has_frac) {
        (false, _) => s,
        (true, false) => -s,
        (true, true) => -s - 1,
    })
}

fn url_decode(s: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            let v = u8::from_str_radix(std::str::from_utf8(hex).ok()?, 16).ok()?;
            out.push(v);
            i += 3;
        } else {
            out.push(s[i]);
            i += 1;
        }
    }
    Some(out)
}

fn base64_decode(s: &[u8]) -> Option<Vec<u8>> {
    use base64::engine::{general_purpose::GeneralPurpose, DecodePaddingMode};
    use base64::Engine;
    const ENGINE: GeneralPurpose = GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(DecodePaddingMode::Indifferent),
    );
    ENGINE.decode(s).ok()
}

impl Pax {
    fn parse(data: &[u8], limits: &Limits) -> Result<Self, TarErrorKind> {
        let mut pax = Pax::default();
        for (key, value) in pax_records(data).map_err(TarErrorKind::Pax)? {
            let no_nul = |v: &[u8]| -> Result<Vec<u8>, TarErrorKind> {
                if v.contains(&0) {
                    Err(TarErrorKind::Pax(format!("NUL byte in {}", show(key))))
                } else {
                    Ok(v.to_vec())
                }
            };
            match key {
                b"path" => pax.path = Some(no_nul(value)?),
                b"linkpath" => pax.linkpath = Some(no_nul(value)?),
                b"size" => pax.size = Some(pax_decimal(key, value).map_err(TarErrorKind::Pax)?),
                b"uid" => pax.uid = Some(pax_decimal(key, value).map_err(TarErrorKind::Pax)?),
                b"gid" => pax.gid = Some(pax_decimal(key, value).map_err(TarErrorKind::Pax)?),
                b"mtime" => pax.mtime = Some(pax_time(key, value).map_err(TarErrorKind::Pax)?),
                _ if key.starts_with(b"GNU.") => {
                    return Err(TarErrorKind::GnuExtension(show(key)));
                }
                _ => {
                    let (list, name, value) = if let Some(name) = key.strip_prefix(b"SCHILY.xattr.")
                    {
                        (&mut pax.schily, name.to_vec(), value.to_vec())
                    } else if let Some(enc) = key.strip_prefix(b"LIBARCHIVE.xattr.") {
                        let name = url_decode(enc).ok_or_else(|| {
                            TarErrorKind::Pax(format!("bad name encoding in {}", show(key)))
                        })?;
                        let value = base64_decode(value).ok_or_else(|| {
                            TarErrorKind::Pax(format!("bad base64 value for {}", show(key)))
                        })?;
                        (&mut pax.libarchive, name, value)
                    } else {
                        // atime, ctime, uname, gname, comment, charset, SCHILY.acl.*, ...:
                        // nothing the image keeps.
                        continue;
                    };
                    // Counted here, before anything is kept: `retain` below stays cheap and a
                    // header of many small records cannot be held as many attributes.
                    pax.xattr_records += 1;
                    if pax.xattr_records > limits.max_xattrs {
                        return Err(TarErrorKind::TooManyXattrs {
                            max: limits.max_xattrs,
                        });
                    }
                    // Value sizes are checked per entry (so the error can name it); the PAX
                    // header that holds them is at most `max_extension` bytes.
                    // Later records win, as in GNU tar and Go.
                    list.retain(|(n, _)| *n != name);
                    list.push((name, value));
                }
            }
        }
        Ok(pax)
    }
}

/// xattr namespaces ext4 stores (a bare prefix names nothing).
fn xattr_namespace_kept(name: &[u8]) -> bool {
    let prefixed = |p: &[u8]| name.len() > p.len() && name.starts_with(p);
    prefixed(b"user.") || prefixed(b"trusted.") || prefixed(b"security.") || is_acl(name)
}

fn is_acl(name: &[u8]) -> bool {
    name == b"system.posix_acl_access" || name == b"system.posix_acl_default"
}

/// A POSIX ACL in the kernel's xattr format, as libext2fs converts it: version 2, then at least
/// one 8-byte entry with a known tag. libext2fs fails on anything else.
fn valid_acl(value: &[u8]) -> bool {
    let Some((version, entries)) = value.split_first_chunk::<4>() else {
        return false;
    };
    u32::from_le_bytes(*version) == 2
        && !entries.is_empty()
        && entries.len() % 8 == 0
        && entries.chunks_exact(8).all(|e| {
            matches!(
                u16::from_le_bytes([e[0], e[1]]),
                0x01 | 0x02 | 0x04 | 0x08 | 0x10 | 0x20
            )
        })
}

fn valid_xattr_name(name: &[u8]) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.iter().any(|b| matches!(b, 0 | b'\n' | b'\r'))
        && !name.windows(3).any(|w| w == b"%25" || w == b"%3D")
}

/// Normalises a raw entry or hardlink name (see the module rules).
pub fn normalise(raw: &[u8], limits: &Limits) -> Result<ImagePath, TarErrorKind> {
    if raw.iter().any(|b| matches!(b, 0 | b'\n' | b'\r')) {
        return Err(TarErrorKind::BadChar);
    }
    let mut names = Vec::new();
    let mut len = 0usize;
    for c in raw.split(|&b| b == b'/') {
        if c.is_empty() || c == b"." {
            continue;
        }
        if c == b".." {
            return Err(TarErrorKind::DotDot);
        }
        if c.len() > limits.max_name {
            return Err(TarErrorKind::NameTooLong {
                len: c.len(),
                max: limits.max_name,
            });
        }
        len += c.len() + 1;
        if len > limits.max_path {
            return Err(TarErrorKind::PathTooLong {
                len: raw.len(),
                max: limits.max_path,
            });
        }
        // Cannot fail: empty, `.`, `..`, `/`, NUL, CR and LF are excluded above.
        names.extend(Name::new(c));
    }
    Ok(ImagePath(names))
}

/// Reads `size` bytes for the stager and remembers whether the archive ran out.
struct Exact<'a, R> {
    r: &'a mut R,
    left: u64,
    short: bool,
    failed: Option<io::Error>,
}

impl<R: Read> Read for Exact<'_, R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.left == 0 {
            return Ok(0);
        }
        let want = buf
            .len()
            .min(usize::try_from(self.left).unwrap_or(usize::MAX));
        match self.r.read(&mut buf[..want]) {
            Ok(0) => {
                self.short = true;
                Err(io::ErrorKind::UnexpectedEof.into())
            }
            Ok(n) => {
                self.left -= n as u64;
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Err(e),
            Err(e) => {
                let shown = io::Error::new(e.kind(), e.to_string());
                self.failed = Some(e);
                Err(shown)
            }
        }
    }
}

/// Streaming reader of one layer's tar.
pub struct TarReader<'a, R> {
    r: R,
    limits: &'a Limits,
    /// What the whole image used so far (shared by the layers' readers).
    counts: &'a ImageCounts,
    pos: u64,
    done: bool,
    notices: Vec<String>,
    dropped_notices: usize,
}

/// What one header (with its extension headers) amounted to.
enum Step {
    Entry(Entry),
    Skipped,
    End,
}

/// Where the current header is, for errors.
struct At {
    offset: u64,
    entry: Option<String>,
}

impl At {
    fn err(&self, kind: TarErrorKind) -> TarError {
        TarError {
            offset: self.offset,
            entry: self.entry.clone(),
            kind,
        }
    }
}

impl<'a, R: Read> TarReader<'a, R> {
    pub fn new(r: R, limits: &'a Limits, counts: &'a ImageCounts) -> Self {
        Self {
            r,
            limits,
            counts,
            pos: 0,
            done: false,
            notices: Vec::new(),
            dropped_notices: 0,
        }
    }

    /// Things a person should know about this layer (skipped entries, dropped xattrs).
    pub fn take_notices(&mut self) -> Vec<String> {
        let mut out = std::mem::take(&mut self.notices);
        if self.dropped_notices > 0 {
            out.push(format!("... and {} more like these", self.dropped_notices));
            self.dropped_notices = 0;
        }
        out
    }

    /// Gives back the underlying reader (to read what follows the archive).
    pub fn into_inner(self) -> R {
        self.r
    }

    fn notice(&mut self, msg: String) {
        if self.notices.len() < MAX_NOTICES {
            self.notices.push(msg);
        } else {
            self.dropped_notices += 1;
        }
    }

    fn read_exact_or(&mut self, buf: &mut [u8], at: &At) -> Result<usize, TarError> {
        let mut got = 0;
        while got < buf.len() {
            match self.r.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(at.err(TarErrorKind::Read(e))),
            }
        }
        self.pos += got as u64;
        Ok(got)
    }

    /// The next block, or `None` at EOF on a block boundary.
    fn block(&mut self, at: &At) -> Result<Option<[u8; BLOCK]>, TarError> {
        let mut b = [0u8; BLOCK];
        match self.read_exact_or(&mut b, at)? {
            0 => Ok(None),
            BLOCK => Ok(Some(b)),
            _ => Err(at.err(TarErrorKind::Truncated)),
        }
    }

    fn skip(&mut self, mut n: u64, at: &At) -> Result<(), TarError> {
        let mut buf = [0u8; 8192];
        while n > 0 {
            let k = usize::try_from(n).unwrap_or(usize::MAX).min(buf.len());
            if self.read_exact_or(&mut buf[..k], at)? != k {
                return Err(at.err(TarErrorKind::Truncated));
            }
            n -= k as u64;
        }
        Ok(())
    }

    fn padding(size: u64) -> u64 {
        (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
    }

    /// Reads an extension header's data (bounded) and its padding.
    fn extension(&mut self, size: u64, at: &At) -> Result<Vec<u8>, TarError> {
        let max = self.limits.max_extension;
        if size > max {
            return Err(at.err(TarErrorKind::ExtensionTooLarge { size, max }));
        }
        let mut data = vec![0u8; usize::try_from(size).unwrap_or(0)];
        if self.read_exact_or(&mut data, at)? != data.len() {
            return Err(at.err(TarErrorKind::Truncated));
        }
        self.skip(Self::padding(size), at)?;
        Ok(data)
    }

    fn field(
        block: &[u8; BLOCK],
        range: std::ops::Range<usize>,
        name: &'static str,
        negative: bool,
        at: &At,
    ) -> Result<i128, TarError> {
        let raw = &block[range];
        number(raw, negative).ok_or_else(|| {
            at.err(TarErrorKind::Number {
                field: name,
                raw: show(raw),
            })
        })
    }

    fn id(value: i128, field: &'static str, at: &At) -> Result<u32, TarError> {
        u32::try_from(value)
            .ok()
            .filter(|v| *v != u32::MAX)
            .ok_or_else(|| at.err(TarErrorKind::OutOfRange { field, value }))
    }

    /// The next entry, or `None` at the end of the archive.
    pub fn next_entry(&mut self, stager: &mut dyn Stager) -> Result<Option<Entry>, TarError> {
        loop {
            match self.step(stager)? {
                Step::Entry(e) => return Ok(Some(e)),
                Step::Skipped => {}
                Step::End => return Ok(None),
            }
        }
    }

    fn step(&mut self, stager: &mut dyn Stager) -> Result<Step, TarError> {
        if self.done {
            return Ok(Step::End);
        }
        let mut pax: Option<Pax> = None;
        let mut long_name: Option<Vec<u8>> = None;
        let mut long_link: Option<Vec<u8>> = None;
        loop {
            let mut at = At {
                offset: self.pos,
                entry: None,
            };
            let Some(block) = self.block(&at)? else {
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(at.err(TarErrorKind::DanglingExtension));
                }
                self.done = true;
                return Ok(Step::End);
            };
            if block.iter().all(|&b| b == 0) {
                let next_at = At {
                    offset: self.pos,
                    entry: None,
                };
                match self.block(&next_at)? {
                    Some(b) if b.iter().any(|&x| x != 0) => {
                        return Err(next_at.err(TarErrorKind::AfterEnd))
                    }
                    _ => {}
                }
                if pax.is_some() || long_name.is_some() || long_link.is_some() {
                    return Err(at.err(TarErrorKind::DanglingExtension));
                }
                self.done = true;
                return Ok(Step::End);
            }
            if !checksum_ok(&block) {
                return Err(at.err(TarErrorKind::Checksum));
            }
            let typeflag = block[field::TYPEFLAG];
            let header_size = Self::field(&block, field::SIZE, "size", false, &at)?;
            let header_size = u64::try_from(header_size).map_err(|_| {
                at.err(TarErrorKind::Number {
                    field: "size",
                    raw: header_size.to_string(),
                })
            })?;
            match typeflag {
                b'x' => {
                    if pax.is_some() {
                        return Err(at.err(TarErrorKind::DuplicateExtension("PAX")));
                    }
                    let data = self.extension(header_size, &at)?;
                    pax = Some(Pax::parse(&data, self.limits).map_err(|k| at.err(k))?);
                    continue;
                }
                b'g' => {
                    let data = self.extension(header_size, &at)?;
                    for (key, _) in pax_records(&data).map_err(|e| at.err(TarErrorKind::Pax(e)))? {
                        if key != b"comment" {
                            return Err(at.err(TarErrorKind::GlobalKeyword(show(key))));
                        }
                    }
                    continue;
                }
                b'L' | b'K' => {
                    let slot = if typeflag == b'L' {
                        &mut long_name
                    } else {
                        &mut long_link
                    };
                    if slot.is_some() {
                        return Err(at.err(TarErrorKind::DuplicateExtension("GNU long name")));
                    }
                    let data = self.extension(header_size, &at)?;
                    let value = cstr(&data).to_vec();
                    if typeflag == b'L' {
                        long_name = Some(value);
                    } else {
                        long_link = Some(value);
                    }
                    continue;
                }
                _ => {}
            }
            return self.entry(
                &block,
                header_size,
                pax.take(),
                long_name,
                long_link,
                &mut at,
                stager,
            );
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn entry(
        &mut self,
        block: &[u8; BLOCK],
        header_size: u64,
        pax: Option<Pax>,
        long_name: Option<Vec<u8>>,
        long_link: Option<Vec<u8>>,
        at: &mut At,
        stager: &mut dyn Stager,
    ) -> Result<Step, TarError> {
        let pax = pax.unwrap_or_default();
        let typeflag = block[field::TYPEFLAG];

        // The name: PAX path, else GNU long name, else the header's (with the ustar prefix).
        let ustar = &block[field::MAGIC] == b"ustar\0";
        let header_name = {
            let name = cstr(&block[field::NAME]);
            let prefix = if ustar {
                cstr(&block[field::PREFIX])
            } else {
                b""
            };
            if ustar && &block[field::STAR_TRAILER] == b"tar\0" && prefix.len() > 130 {
                return Err(at.err(TarErrorKind::AmbiguousPrefix));
            }
            if prefix.is_empty() {
                name.to_vec()
            } else {
                [prefix, b"/", name].concat()
            }
        };
        if let (Some(p), Some(l)) = (&pax.path, &long_name) {
            if p != l {
                return Err(at.err(TarErrorKind::ConflictingNames("name")));
            }
        }
        if let (Some(p), Some(l)) = (&pax.linkpath, &long_link) {
            if p != l {
                return Err(at.err(TarErrorKind::ConflictingNames("link name")));
            }
        }
        let raw_name = pax.path.clone().or(long_name).unwrap_or(header_name);
        at.entry = Some(show(&raw_name));
        let raw_link = pax
            .linkpath
            .clone()
            .or(long_link)
            .unwrap_or_else(|| cstr(&block[field::LINKNAME]).to_vec());

        let n = self.counts.entries.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.limits.max_entries {
            return Err(at.err(TarErrorKind::TooManyEntries {
                max: self.limits.max_entries,
            }));
        }

        // How many data bytes follow, and what kind of entry this is.
        let trailing_slash = raw_name.ends_with(b"/");
        let size = pax.size.unwrap_or(header_size);
        enum Shape {
            File,
            Dir,
            Symlink,
            Hardlink,
            Char,
            Block,
            Fifo,
        }
        let (shape, data) = match typeflag {
            b'0' if trailing_slash => return Err(at.err(TarErrorKind::AmbiguousTrailingSlash)),
            0 if trailing_slash => (Shape::Dir, size),
            b'0' | 0 => (Shape::File, size),
            b'5' => (Shape::Dir, 0),
            b'1' => (Shape::Hardlink, pax.size.unwrap_or(0)),
            b'2' => (Shape::Symlink, size),
            b'3' => (Shape::Char, size),
            b'4' => (Shape::Block, size),
            b'6' => (Shape::Fifo, size),
            b'S' => return Err(at.err(TarErrorKind::GnuExtension("S (sparse file)".into()))),
            b'M' | b'V' | b'D' | b'N' => {
                return Err(at.err(TarErrorKind::GnuExtension(format!(
                    "{} header",
                    char::from(typeflag)
                ))))
            }
            other => return Err(at.err(TarErrorKind::UnsupportedType(char::from(other)))),
        };
        if !matches!(shape, Shape::File) && data != 0 {
            return Err(at.err(TarErrorKind::HeaderOnlyWithData { size: data }));
        }

        let meta = Meta {
            mode: u32::try_from(Self::field(block, field::MODE, "mode", false, at)? & 0o7777)
                .unwrap_or(0),
            uid: Self::id(
                pax.uid
                    .map(i128::from)
                    .map_or_else(|| Self::field(block, field::UID, "uid", false, at), Ok)?,
                "uid",
                at,
            )?,
            gid: Self::id(
                pax.gid
                    .map(i128::from)
                    .map_or_else(|| Self::field(block, field::GID, "gid", false, at), Ok)?,
                "gid",
                at,
            )?,
            mtime: {
                let t = match pax.mtime {
                    Some(t) => t,
                    None => Self::field(block, field::MTIME, "mtime", true, at)?,
                };
                // Clamped: pre-1970 times are meaningless in images, later ones beyond ext4.
                i64::try_from(t.clamp(0, i128::from(MAX_MTIME))).unwrap_or(0)
            },
        };

        let path = normalise(&raw_name, self.limits).map_err(|k| at.err(k))?;
        let parents = path.split_last().map(|(_, p)| p).unwrap_or(&[]);
        if parents.iter().any(|n| n.as_bytes().starts_with(b".wh.")) {
            return Err(at.err(TarErrorKind::WhiteoutParent));
        }

        // Whiteouts: their data (normally none) is dropped.
        if let Some((last, parent)) = path.split_last() {
            if let Some(target) = last.as_bytes().strip_prefix(b".wh.") {
                self.skip(data + Self::padding(data), at)?;
                let (path, kind) = if last.as_bytes() == b".wh..wh..opq" {
                    (ImagePath(parent.to_vec()), EntryKind::Opaque)
                } else if target.starts_with(b".wh.") {
                    self.notice(format!(
                        "skipped `{path}`: AUFS metadata, not part of the image"
                    ));
                    return Ok(Step::Skipped);
                } else {
                    let hidden = Name::new(target).ok_or_else(|| {
                        at.err(if target.is_empty() {
                            TarErrorKind::BareWhiteout
                        } else {
                            TarErrorKind::DotDot
                        })
                    })?;
                    let mut names = parent.to_vec();
                    names.push(hidden);
                    (ImagePath(names), EntryKind::Whiteout)
                };
                self.charge(path.byte_len(), at)?;
                return Ok(Step::Entry(Entry {
                    path,
                    kind,
                    meta,
                    xattrs: Vec::new(),
                }));
            }
        }

        let device = |at: &At| -> Result<Device, TarError> {
            let major = Self::field(block, field::DEVMAJOR, "devmajor", false, at)?;
            let minor = Self::field(block, field::DEVMINOR, "devminor", false, at)?;
            // What Linux's dev_t holds: 12-bit major, 20-bit minor.
            if major > 0xfff {
                return Err(at.err(TarErrorKind::OutOfRange {
                    field: "device major",
                    value: major,
                }));
            }
            if minor > 0xf_ffff {
                return Err(at.err(TarErrorKind::OutOfRange {
                    field: "device minor",
                    value: minor,
                }));
            }
            Ok(Device {
                major: u32::try_from(major).unwrap_or(0),
                minor: u32::try_from(minor).unwrap_or(0),
            })
        };
        let kind = match shape {
            Shape::Dir => EntryKind::Dir,
            Shape::Fifo => EntryKind::Fifo,
            Shape::Char => EntryKind::Char(device(at)?),
            Shape::Block => EntryKind::Block(device(at)?),
            Shape::Symlink => {
                if raw_link.is_empty() {
                    return Err(at.err(TarErrorKind::EmptyLink));
                }
                if raw_link.iter().any(|b| matches!(b, 0 | b'\n' | b'\r')) {
                    return Err(at.err(TarErrorKind::BadChar));
                }
                if raw_link.len() > self.limits.max_link {
                    return Err(at.err(TarErrorKind::LinkTooLong {
                        len: raw_link.len(),
                        max: self.limits.max_link,
                    }));
                }
                EntryKind::Symlink(raw_link.into_boxed_slice())
            }
            Shape::Hardlink => {
                let target = normalise(&raw_link, self.limits).map_err(|k| at.err(k))?;
                if target.is_root() {
                    return Err(at.err(TarErrorKind::HardlinkToRoot));
                }
                EntryKind::Hardlink(target)
            }
            Shape::File => {
                let content = if data == 0 {
                    Content::Empty
                } else {
                    self.stage(stager, data, at)?
                };
                EntryKind::File(content)
            }
        };
        if path.is_root() && kind != EntryKind::Dir {
            return Err(at.err(TarErrorKind::RootNotDir));
        }

        let mut xattrs: Vec<Xattr> = Vec::new();
        let schily_names: Vec<Vec<u8>> = pax.schily.iter().map(|(n, _)| n.clone()).collect();
        let libarchive = pax
            .libarchive
            .into_iter()
            .filter(|(n, _)| !schily_names.contains(n));
        for (name, value) in pax.schily.into_iter().chain(libarchive) {
            if !valid_xattr_name(&name) {
                return Err(at.err(TarErrorKind::BadXattrName(show(&name))));
            }
            if value.len() > self.limits.max_xattr_value {
                return Err(at.err(TarErrorKind::XattrTooLarge {
                    name: show(&name),
                    len: value.len(),
                    max: self.limits.max_xattr_value,
                }));
            }
            if is_acl(&name) && !valid_acl(&value) {
                return Err(at.err(TarErrorKind::BadAcl(show(&name))));
            }
            if !xattr_namespace_kept(&name) {
                self.notice(format!(
                    "dropped extended attribute `{}` of `{path}`: ext4 has no such namespace",
                    show(&name)
                ));
                continue;
            }
            xattrs.push(Xattr {
                name: name.into_boxed_slice(),
                value: value.into_boxed_slice(),
            });
        }
        xattrs.sort_by(|a, b| a.name.cmp(&b.name));
        let space = xattr_space(&xattrs);
        if space > XATTR_BLOCK_SPACE {
            return Err(at.err(TarErrorKind::XattrsTooLarge {
                len: space,
                max: XATTR_BLOCK_SPACE,
            }));
        }

        let link_len = match &kind {
            EntryKind::Symlink(t) => t.len(),
            EntryKind::Hardlink(t) => t.byte_len(),
            _ => 0,
        };
        let xattr_len: usize = xattrs.iter().map(|x| x.name.len() + x.value.len()).sum();
        self.charge(path.byte_len() + link_len + xattr_len, at)?;
        Ok(Step::Entry(Entry {
            path,
            kind,
            meta,
            xattrs,
        }))
    }

    /// Counts an entry's metadata against the image's budget.
    fn charge(&self, bytes: usize, at: &At) -> Result<(), TarError> {
        let bytes = (bytes + ENTRY_MEMORY) as u64;
        let used = self.counts.metadata.fetch_add(bytes, Ordering::Relaxed) + bytes;
        if used > self.limits.max_metadata {
            return Err(at.err(TarErrorKind::MetadataTooLarge {
                max: self.limits.max_metadata,
            }));
        }
        Ok(())
    }

    fn stage(&mut self, stager: &mut dyn Stager, size: u64, at: &At) -> Result<Content, TarError> {
        let mut exact = Exact {
            r: &mut self.r,
            left: size,
            short: false,
            failed: None,
        };
        let result = stager.stage(&mut exact, size);
        let (left, short, failed) = (exact.left, exact.short, exact.failed.take());
        self.pos += size - left;
        if let Some(e) = failed {
            return Err(at.err(TarErrorKind::Read(e)));
        }
        if short {
            return Err(at.err(TarErrorKind::Truncated));
        }
        let content = result.map_err(|e| at.err(TarErrorKind::Stage(e)))?;
        if left != 0 {
            return Err(at.err(TarErrorKind::Stage(io::Error::other(
                "the stager did not consume the whole file",
            ))));
        }
        self.skip(Self::padding(size), at)?;
        Ok(content)
    }
}

/// Reads every entry of a layer tar (for tests and fuzzing; the driver streams instead).
pub fn read_entries<R: Read>(
    r: R,
    limits: &Limits,
    stager: &mut dyn Stager,
) -> Result<(Vec<Entry>, Vec<String>), TarError> {
    let counts = ImageCounts::default();
    let mut reader = TarReader::new(r, limits, &counts);
    let mut out = Vec::new();
    while let Some(e) = reader.next_entry(stager)? {
        out.push(e);
    }
    Ok((out, reader.take_notices()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Crafts archives block by block with the `tar` crate's low-level header API.
    #[derive(Default)]
    pub(crate) struct Ar(pub Vec<u8>);

    pub(crate) fn ustar(name: &[u8], typ: u8, size: u64) -> ::tar::Header {
        let mut h = ::tar::Header::new_ustar();
        h.as_old_mut().name[..name.len()].copy_from_slice(name);
        // Raw byte: the tar crate would turn `\0` into `0`.
        h.as_mut_bytes()[156] = typ;
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1_700_000_000);
        h.set_cksum();
        h
    }

    impl Ar {
        pub(crate) fn raw(&mut self, h: &::tar::Header, data: &[u8]) -> &mut Self {
            self.0.extend_from_slice(h.as_bytes());
            self.0.extend_from_slice(data);
            self.0.resize(self.0.len().next_multiple_of(BLOCK), 0);
            self
        }
        pub(crate) fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
            let h = ustar(name.as_bytes(), b'0', data.len() as u64);
            self.raw(&h, data)
        }
        pub(crate) fn entry(&mut self, name: &str, typ: u8, link: &str) -> &mut Self {
            let mut h = ustar(name.as_bytes(), typ, 0);
            h.as_old_mut().linkname[..link.len()].copy_from_slice(link.as_bytes());
            h.set_cksum();
            self.raw(&h, b"")
        }
        pub(crate) fn pax(&mut self, typ: u8, records: &[(&str, &[u8])]) -> &mut Self {
            let mut data = Vec::new();
            for (k, v) in records {
                let body = [b" ", k.as_bytes(), b"=", v, b"\n"].concat();
                let mut len = body.len() + 1;
                while len.to_string().len() + body.len() != len {
                    len += 1;
                }
                data.extend_from_slice(len.to_string().as_bytes());
                data.extend_from_slice(&body);
            }
            let h = ustar(b"././@PaxHeader", typ, data.len() as u64);
            self.raw(&h, &data)
        }
        pub(crate) fn end(&mut self) -> Vec<u8> {
            self.0.extend_from_slice(&[0u8; 2 * BLOCK]);
            std::mem::take(&mut self.0)
        }
    }

    fn limits() -> Limits {
        Limits::default()
    }

    fn read(bytes: &[u8]) -> Result<Vec<Entry>, TarError> {
        read_entries(bytes, &limits(), &mut Discard).map(|(e, _)| e)
    }

    fn err(bytes: &[u8]) -> TarErrorKind {
        read(bytes).unwrap_err().kind
    }

    fn paths(entries: &[Entry]) -> Vec<String> {
        entries.iter().map(|e| e.path.to_string()).collect()
    }

    #[test]
    fn names_are_normalised_and_dot_dot_refused() {
        let l = limits();
        for (raw, want) in [
            (&b"./a//b/"[..], "/a/b"),
            (b"/etc/passwd", "/etc/passwd"),
            (b"///a/./b/.", "/a/b"),
            (b".", "/"),
            (b"./", "/"),
        ] {
            assert_eq!(normalise(raw, &l).unwrap().to_string(), want, "{raw:?}");
        }
        for raw in [&b"../x"[..], b"a/../b", b"/..", b"a/.."] {
            assert!(
                matches!(normalise(raw, &l), Err(TarErrorKind::DotDot)),
                "{raw:?}"
            );
        }
        for raw in [&b"a\nb"[..], b"a\rb", b"a\0b"] {
            assert!(
                matches!(normalise(raw, &l), Err(TarErrorKind::BadChar)),
                "{raw:?}"
            );
        }
        let long = vec![b'x'; 256];
        assert!(matches!(
            normalise(&long, &l),
            Err(TarErrorKind::NameTooLong { len: 256, max: 255 })
        ));
        assert!(normalise(&long[..255], &l).is_ok());
        // 16 components of 255 bytes plus slashes: 4096 is the limit.
        let ok = [&long[..255]; 16].join(&b'/');
        assert_eq!(ok.len() + 1, 4096);
        assert!(normalise(&ok, &l).is_ok());
        let too_long = [ok.as_slice(), b"/x"].concat();
        assert!(matches!(
            normalise(&too_long, &l),
            Err(TarErrorKind::PathTooLong { max: 4096, .. })
        ));
    }

    #[test]
    fn regular_files_are_staged_and_metadata_kept() {
        let mut h = ustar(b"usr/bin/su", b'0', 5);
        h.set_mode(0o104755);
        h.set_uid(1000);
        h.set_gid(50);
        h.set_cksum();
        let bytes = Ar::default().raw(&h, b"hello").file("empty", b"").end();
        struct Keep(Vec<Vec<u8>>);
        impl Stager for Keep {
            fn stage(&mut self, data: &mut dyn Read, size: u64) -> io::Result<Content> {
                let mut v = Vec::new();
                data.read_to_end(&mut v)?;
                self.0.push(v);
                Ok(Content::Staged {
                    id: self.0.len() as u64,
                    size,
                })
            }
        }
        let mut keep = Keep(Vec::new());
        let (entries, _) = read_entries(&bytes[..], &limits(), &mut keep).unwrap();
        assert_eq!(keep.0, vec![b"hello".to_vec()]);
        assert_eq!(
            entries[0],
            Entry {
                path: normalise(b"usr/bin/su", &limits()).unwrap(),
                kind: EntryKind::File(Content::Staged { id: 1, size: 5 }),
                meta: Meta {
                    mode: 0o4755,
                    uid: 1000,
                    gid: 50,
                    mtime: 1_700_000_000
                },
                xattrs: vec![],
            }
        );
        assert_eq!(entries[1].kind, EntryKind::File(Content::Empty));
    }

    #[test]
    fn pax_size_overrides_the_header_size_both_ways() {
        // Hidden inside the PAX-sized data: a header only a reader ignoring PAX would see.
        let mut hidden = Ar::default();
        hidden.file("hidden", b"x");
        let inner = hidden.0.clone();
        let bytes = Ar::default()
            .pax(b'x', &[("size", inner.len().to_string().as_bytes())])
            .raw(&ustar(b"outer", b'0', 0), &inner)
            .file("after", b"y")
            .end();
        let e = read(&bytes).unwrap();
        assert_eq!(paths(&e), ["/outer", "/after"]);
        assert_eq!(
            e[0].kind,
            EntryKind::File(Content::Staged { id: 0, size: 1024 })
        );
        // The other way: the header claims data, PAX says none, so the next block is a header.
        let bytes = Ar::default()
            .pax(b'x', &[("size", b"0")])
            .raw(&ustar(b"outer", b'0', 1024), b"")
            .file("next", b"z")
            .end();
        assert_eq!(paths(&read(&bytes).unwrap()), ["/outer", "/next"]);
    }

    #[test]
    fn header_only_types_with_data_are_refused_but_dirs_and_link_sizes_ignored() {
        for typ in [b'2', b'3', b'4', b'6'] {
            let bytes = Ar::default().raw(&ustar(b"x", typ, 512), &[0u8; 512]).end();
            assert!(
                matches!(err(&bytes), TarErrorKind::HeaderOnlyWithData { size: 512 }),
                "{}",
                typ as char
            );
        }
        // PAX size on a hardlink: GNU skips it, Go does not.
        let bytes = Ar::default()
            .file("t", b"")
            .pax(b'x', &[("size", b"512")])
            .entry("l", b'1', "t")
            .end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::HeaderOnlyWithData { .. }
        ));
        // Header sizes of directories and hardlinks: no data follows (GNU and Go agree).
        let mut dir = ustar(b"d/", b'5', 512);
        dir.set_cksum();
        let mut link = ustar(b"l", b'1', 512);
        link.as_old_mut().linkname[..1].copy_from_slice(b"t");
        link.set_cksum();
        let bytes = Ar::default()
            .file("t", b"")
            .raw(&dir, b"")
            .raw(&link, b"")
            .file("z", b"")
            .end();
        assert_eq!(paths(&read(&bytes).unwrap()), ["/t", "/d", "/l", "/z"]);
    }

    #[test]
    fn trailing_slashes_on_regular_types() {
        let bytes = Ar::default().raw(&ustar(b"d/", 0, 0), b"").end();
        assert_eq!(read(&bytes).unwrap()[0].kind, EntryKind::Dir);
        let bytes = Ar::default().raw(&ustar(b"d/", 0, 1), b"x").end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::HeaderOnlyWithData { size: 1 }
        ));
        let bytes = Ar::default().raw(&ustar(b"d/", b'0', 0), b"").end();
        assert!(matches!(err(&bytes), TarErrorKind::AmbiguousTrailingSlash));
    }

    #[test]
    fn long_names_from_gnu_and_pax_and_conflicts_refused() {
        let long = format!("{}/file", "d".repeat(200));
        let mut l = ustar(b"././@LongLink", b'L', long.len() as u64 + 1);
        l.set_cksum();
        let bytes = Ar::default()
            .raw(&l, format!("{long}\0").as_bytes())
            .file("short", b"")
            .pax(b'x', &[("path", long.as_bytes()), ("linkpath", b"/target")])
            .entry("ignored", b'2', "")
            .end();
        let e = read(&bytes).unwrap();
        assert_eq!(e[0].path.to_string(), format!("/{long}"));
        assert_eq!(e[1].path.to_string(), format!("/{long}"));
        assert_eq!(e[1].kind, EntryKind::Symlink(b"/target"[..].into()));
        // Both a long name and a PAX path, differing: Go and GNU disagree.
        let bytes = Ar::default()
            .raw(&l, format!("{long}\0").as_bytes())
            .pax(b'x', &[("path", b"other")])
            .file("short", b"")
            .end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::ConflictingNames("name")
        ));
        // Two PAX headers, or two long names, for one entry.
        let bytes = Ar::default()
            .pax(b'x', &[("path", b"a")])
            .pax(b'x', &[("path", b"b")])
            .file("short", b"")
            .end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::DuplicateExtension("PAX")
        ));
        // An extension header at the very end.
        let bytes = Ar::default().pax(b'x', &[("path", b"a")]).end();
        assert!(matches!(err(&bytes), TarErrorKind::DanglingExtension));
    }

    #[test]
    fn ustar_prefix_is_joined_to_the_name() {
        let mut h = ustar(b"file", b'0', 0);
        h.as_ustar_mut().unwrap().prefix[..3].copy_from_slice(b"a/b");
        h.set_cksum();
        let bytes = Ar::default().raw(&h, b"").end();
        assert_eq!(paths(&read(&bytes).unwrap()), ["/a/b/file"]);
        // GNU-format headers have no prefix.
        let mut g = ::tar::Header::new_gnu();
        g.as_old_mut().name[..4].copy_from_slice(b"file");
        g.set_size(0);
        g.set_mode(0o644);
        g.set_mtime(0);
        g.set_uid(0);
        g.set_gid(0);
        g.set_cksum();
        assert_eq!(
            paths(&read(&Ar::default().raw(&g, b"").end()).unwrap()),
            ["/file"]
        );
    }

    #[test]
    fn global_headers_may_only_comment() {
        let bytes = Ar::default()
            .pax(b'g', &[("comment", b"git commit abc")])
            .file("a", b"")
            .end();
        assert_eq!(paths(&read(&bytes).unwrap()), ["/a"]);
        let bytes = Ar::default()
            .pax(b'g', &[("path", b"evil")])
            .file("a", b"")
            .end();
        assert!(matches!(err(&bytes), TarErrorKind::GlobalKeyword(k) if k == "path"));
    }

    #[test]
    fn malformed_pax_records_are_refused() {
        for data in [
            &b"5 a=b"[..],
            b"x path=a\n",
            b"9 path=a\n\n",
            b"3 =\n",
            b"12 pathNOEQ\n",
        ] {
            let h = ustar(b"p", b'x', data.len() as u64);
            let bytes = Ar::default().raw(&h, data).file("a", b"").end();
            assert!(matches!(err(&bytes), TarErrorKind::Pax(_)), "{data:?}");
        }
        let bytes = Ar::default()
            .pax(b'x', &[("path", b"a\0b")])
            .file("a", b"")
            .end();
        assert!(matches!(err(&bytes), TarErrorKind::Pax(_)));
        let bytes = Ar::default()
            .pax(b'x', &[("uid", b"12x")])
            .file("a", b"")
            .end();
        assert!(matches!(err(&bytes), TarErrorKind::Pax(_)));
        let bytes = Ar::default()
            .pax(b'x', &[("GNU.sparse.map", b"0,1")])
            .file("a", b"")
            .end();
        assert!(matches!(err(&bytes), TarErrorKind::GnuExtension(_)));
    }

    #[test]
    fn pax_ids_and_times_override_the_header() {
        let bytes = Ar::default()
            .pax(
                b'x',
                &[
                    ("uid", b"100000"),
                    ("gid", b"4294967294"),
                    ("mtime", b"1700000000.999"),
                ],
            )
            .file("a", b"")
            .pax(b'x', &[("mtime", b"-5.5")])
            .file("b", b"")
            .pax(b'x', &[("mtime", b"99999999999999")])
            .file("c", b"")
            .end();
        let e = read(&bytes).unwrap();
        assert_eq!(
            e[0].meta,
            Meta {
                mode: 0o644,
                uid: 100_000,
                gid: 4_294_967_294,
                mtime: 1_700_000_000
            }
        );
        assert_eq!(e[1].meta.mtime, 0, "before 1970 is clamped to 0");
        assert_eq!(e[2].meta.mtime, MAX_MTIME);
        let bytes = Ar::default()
            .pax(b'x', &[("uid", b"4294967295")])
            .file("a", b"")
            .end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::OutOfRange { field: "uid", .. }
        ));
    }

    #[test]
    fn whiteouts_are_classified() {
        let bytes = Ar::default()
            .file("etc/.wh.passwd", b"ignored data")
            .file("var/.wh..wh..opq", b"")
            .file(".wh..wh.plnk", b"")
            .file(".wh..foo", b"")
            .end();
        let (e, notices) = read_entries(&bytes[..], &limits(), &mut Discard).unwrap();
        assert_eq!(paths(&e), ["/etc/passwd", "/var", "/.foo"]);
        assert_eq!(e[0].kind, EntryKind::Whiteout);
        assert_eq!(e[1].kind, EntryKind::Opaque);
        assert_eq!(e[2].kind, EntryKind::Whiteout);
        assert!(notices[0].contains("AUFS"), "{notices:?}");
        for bad in ["a/.wh.", ".wh."] {
            let bytes = Ar::default().file(bad, b"").end();
            assert!(matches!(err(&bytes), TarErrorKind::BareWhiteout), "{bad}");
        }
        let bytes = Ar::default().file(".wh...", b"").end();
        assert!(matches!(err(&bytes), TarErrorKind::DotDot));
        let bytes = Ar::default().file(".wh.d/file", b"").end();
        assert!(matches!(err(&bytes), TarErrorKind::WhiteoutParent));
        let bytes = Ar::default().file(".wh..wh..opq/file", b"").end();
        assert!(matches!(err(&bytes), TarErrorKind::WhiteoutParent));
    }

    #[test]
    fn xattrs_from_schily_and_libarchive() {
        let bytes = Ar::default()
            .pax(
                b'x',
                &[
                    ("SCHILY.xattr.security.capability", b"\x01\x00\x00\x02"),
                    ("LIBARCHIVE.xattr.user.a%3Db", b"dmFsdWU"),
                    ("LIBARCHIVE.xattr.security.capability", b"aWdub3JlZA=="),
                    ("SCHILY.xattr.system.nfs4_acl", b"x"),
                ],
            )
            .file("bin/ping", b"")
            .end();
        let (e, notices) = read_entries(&bytes[..], &limits(), &mut Discard).unwrap();
        let x: Vec<(String, Vec<u8>)> = e[0]
            .xattrs
            .iter()
            .map(|x| (show(&x.name), x.value.to_vec()))
            .collect();
        assert_eq!(
            x,
            [
                (
                    "security.capability".to_string(),
                    b"\x01\x00\x00\x02".to_vec()
                ),
                ("user.a=b".to_string(), b"value".to_vec()),
            ]
        );
        assert!(
            notices.iter().any(|n| n.contains("system.nfs4_acl")),
            "{notices:?}"
        );
        let many: Vec<(String, Vec<u8>)> = (0..65)
            .map(|i| (format!("SCHILY.xattr.user.{i}"), b"v".to_vec()))
            .collect();
        let records: Vec<(&str, &[u8])> = many
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_slice()))
            .collect();
        let bytes = Ar::default().pax(b'x', &records).file("a", b"").end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::TooManyXattrs { max: 64 }
        ));
        let big = vec![b'v'; 65 * 1024 + 1];
        let bytes = Ar::default()
            .pax(b'x', &[("SCHILY.xattr.user.big", &big)])
            .file("a", b"")
            .end();
        assert!(matches!(err(&bytes), TarErrorKind::XattrTooLarge { .. }));
        let acl = [
            &2u32.to_le_bytes()[..],
            &[1, 0, 6, 0, 0, 0, 0, 0],
            &[0x20, 0, 4, 0, 0, 0, 0, 0],
        ]
        .concat();
        let bytes = Ar::default()
            .pax(
                b'x',
                &[
                    ("SCHILY.xattr.system.posix_acl_access", &acl),
                    ("SCHILY.xattr.user.", b"v"),
                ],
            )
            .file("a", b"")
            .end();
        let (e, notices) = read_entries(&bytes[..], &limits(), &mut Discard).unwrap();
        assert_eq!(e[0].xattrs.len(), 1);
        assert!(notices[0].contains("`user.`"), "{notices:?}");
        for bad in [
            &acl[..8],
            &acl[..11],
            &[&3u32.to_le_bytes()[..], &acl[4..]].concat()[..],
        ] {
            let bytes = Ar::default()
                .pax(b'x', &[("SCHILY.xattr.system.posix_acl_default", bad)])
                .file("a", b"")
                .end();
            assert!(matches!(err(&bytes), TarErrorKind::BadAcl(_)), "{bad:?}");
        }
        let bytes = Ar::default()
            .pax(b'x', &[("SCHILY.xattr.user.a%25b", b"v")])
            .file("a", b"")
            .end();
        assert!(matches!(err(&bytes), TarErrorKind::BadXattrName(_)));
    }

    #[test]
    fn xattrs_must_fit_ext4s_block_and_errors_name_the_entry() {
        // 4096 bytes is ext4's most per value, but not with a name in the same block.
        let max = vec![b'v'; 4096];
        let bytes = Ar::default()
            .pax(b'x', &[("SCHILY.xattr.user.x", &max)])
            .file("a", b"")
            .end();
        let e = read(&bytes).unwrap_err();
        assert!(
            matches!(
                e.kind,
                TarErrorKind::XattrsTooLarge {
                    len: 4120,
                    max: 4060
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().starts_with("entry `a` (header at byte "),
            "{e}"
        );
        let over = vec![b'v'; 4097];
        let bytes = Ar::default()
            .pax(b'x', &[("SCHILY.xattr.user.x", &over)])
            .file("a", b"")
            .end();
        let e = read(&bytes).unwrap_err().to_string();
        assert!(e.starts_with("entry `a` (header at byte "), "{e}");
        assert!(
            e.ends_with("has an extended attribute `user.x` with a 4097-byte value; ext4 stores at most 4096 bytes per value"),
            "{e}"
        );
        // Each value fits, together they do not.
        let half = vec![b'v'; 2020];
        let bytes = Ar::default()
            .pax(
                b'x',
                &[
                    ("SCHILY.xattr.user.a", &half),
                    ("SCHILY.xattr.user.b", &half),
                ],
            )
            .file("a", b"")
            .end();
        assert!(matches!(
            read(&bytes).unwrap_err().kind,
            TarErrorKind::XattrsTooLarge { len: 4088, .. }
        ));
        // What fits exactly is kept.
        let fits = vec![b'v'; 4060 - 24];
        let bytes = Ar::default()
            .pax(b'x', &[("SCHILY.xattr.user.x", &fits)])
            .file("a", b"")
            .end();
        assert_eq!(xattr_space(&read(&bytes).unwrap()[0].xattrs), 4060);
    }

    #[test]
    fn the_image_wide_metadata_budget_counts_paths_links_xattrs_and_entries() {
        let l = Limits {
            max_metadata: 2 * ENTRY_MEMORY as u64 + 80,
            ..limits()
        };
        let counts = ImageCounts::default();
        // `/dir/file` and `user.k=val` (9 + 9), `/dir/link` and its target (9 + 4): 31 bytes
        // and two entries fit; `/dir/.wh.x`, kept as `/dir/x` (6), is one too many.
        let bytes = Ar::default()
            .pax(b'x', &[("SCHILY.xattr.user.k", b"val")])
            .file("dir/file", b"")
            .entry("dir/link", b'2', "file")
            .file("dir/.wh.x", b"")
            .end();
        let mut reader = TarReader::new(&bytes[..], &l, &counts);
        let mut n = 0;
        let err = loop {
            match reader.next_entry(&mut Discard) {
                Ok(Some(_)) => n += 1,
                Ok(None) => panic!("the budget was not enforced"),
                Err(e) => break e,
            }
        };
        assert_eq!(n, 2);
        assert!(
            matches!(err.kind, TarErrorKind::MetadataTooLarge { .. }),
            "{err}"
        );
        assert!(err.to_string().starts_with("entry `dir/.wh.x`"), "{err}");
        assert_eq!(
            counts.metadata.load(Ordering::Relaxed),
            3 * ENTRY_MEMORY as u64 + 37
        );
    }

    #[test]
    fn checksums_numbers_and_the_end_of_the_archive() {
        let mut h = ustar(b"a", b'0', 0);
        h.as_mut_bytes()[148] = b'7';
        assert!(matches!(
            err(&Ar::default().raw(&h, b"").end()),
            TarErrorKind::Checksum
        ));
        // A checksum over signed bytes (old BSD tars) is accepted.
        let mut h = ustar("caf\u{e9}".as_bytes(), b'0', 0);
        let signed: i64 = h
            .as_bytes()
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    i64::from(b as i8)
                }
            })
            .sum();
        h.as_mut_bytes()[148..156].copy_from_slice(format!("{signed:06o}\0 ").as_bytes());
        assert_eq!(
            paths(&read(&Ar::default().raw(&h, b"").end()).unwrap()),
            ["/caf\u{e9}"]
        );
        // Base-256 sizes.
        let mut h = ustar(b"a", b'0', 0);
        let f = &mut h.as_mut_bytes()[124..136];
        f.fill(0);
        f[0] = 0x80;
        f[11] = 3;
        h.set_cksum();
        let e = read(&Ar::default().raw(&h, b"abc").end()).unwrap();
        assert_eq!(
            e[0].kind,
            EntryKind::File(Content::Staged { id: 0, size: 3 })
        );
        // Garbage in a numeric field.
        let mut h = ustar(b"a", b'0', 0);
        h.as_mut_bytes()[108..116].copy_from_slice(b"12 x\0\0\0\0");
        h.set_cksum();
        assert!(matches!(
            err(&Ar::default().raw(&h, b"").end()),
            TarErrorKind::Number { field: "uid", .. }
        ));
        // No end blocks at all, or a single one: fine.
        let mut one = Ar::default();
        one.file("a", b"");
        let mut bytes = one.0.clone();
        assert_eq!(paths(&read(&bytes).unwrap()), ["/a"]);
        bytes.extend_from_slice(&[0u8; BLOCK]);
        assert_eq!(paths(&read(&bytes).unwrap()), ["/a"]);
        // A zero block followed by more entries: GNU stops, Go fails; refused.
        let mut more = Ar::default();
        more.file("a", b"");
        more.0.extend_from_slice(&[0u8; BLOCK]);
        let bytes = more.file("b", b"").end();
        assert!(matches!(err(&bytes), TarErrorKind::AfterEnd));
        // Truncated data or header.
        let mut t = Ar::default();
        t.file("a", &[1u8; 1000]);
        assert!(matches!(err(&t.0[..1000]), TarErrorKind::Truncated));
        assert!(matches!(err(&t.0[..100]), TarErrorKind::Truncated));
    }

    #[test]
    fn unsupported_types_are_refused() {
        for (typ, want) in [
            (b'S', "sparse"),
            (b'7', "'7'"),
            (b'V', "V header"),
            (b'Z', "'Z'"),
        ] {
            let bytes = Ar::default().raw(&ustar(b"x", typ, 0), b"").end();
            let msg = err(&bytes).to_string();
            assert!(msg.contains(want), "{msg}");
        }
    }

    #[test]
    fn links_devices_and_the_root() {
        let mut dev = ustar(b"dev/null", b'3', 0);
        dev.set_device_major(1).unwrap();
        dev.set_device_minor(3).unwrap();
        dev.set_cksum();
        let bytes = Ar::default()
            .raw(&dev, b"")
            .entry("bin/sh", b'2', "busybox")
            .entry("bin/ash", b'1', "/bin/./busybox")
            .entry("fifo", b'6', "")
            .entry("./", b'5', "")
            .end();
        let e = read(&bytes).unwrap();
        assert_eq!(e[0].kind, EntryKind::Char(Device { major: 1, minor: 3 }));
        assert_eq!(e[1].kind, EntryKind::Symlink(b"busybox"[..].into()));
        assert_eq!(
            e[2].kind,
            EntryKind::Hardlink(normalise(b"bin/busybox", &limits()).unwrap())
        );
        assert_eq!(e[3].kind, EntryKind::Fifo);
        assert!(e[4].path.is_root() && e[4].kind == EntryKind::Dir);
        for (name, typ, link) in [("/", b'2', "/etc"), (".", b'0', ""), ("./", b'1', "x")] {
            let bytes = Ar::default().entry(name, typ, link).end();
            assert!(matches!(err(&bytes), TarErrorKind::RootNotDir), "{name}");
        }
        let bytes = Ar::default().entry("l", b'1', "/").end();
        assert!(matches!(err(&bytes), TarErrorKind::HardlinkToRoot));
        let bytes = Ar::default().entry("l", b'1', "../../etc/passwd").end();
        assert!(matches!(err(&bytes), TarErrorKind::DotDot));
        let bytes = Ar::default().entry("l", b'2', "").end();
        assert!(matches!(err(&bytes), TarErrorKind::EmptyLink));
        let mut big = ustar(b"d", b'4', 0);
        big.set_device_major(0o7777777).unwrap();
        big.set_cksum();
        assert!(matches!(
            err(&Ar::default().raw(&big, b"").end()),
            TarErrorKind::OutOfRange {
                field: "device major",
                ..
            }
        ));
    }

    #[test]
    fn entry_count_and_extension_size_are_limited() {
        let l = Limits {
            max_entries: 2,
            ..limits()
        };
        let bytes = Ar::default()
            .file("a", b"")
            .file("b", b"")
            .file("c", b"")
            .end();
        let e = read_entries(&bytes[..], &l, &mut Discard).unwrap_err();
        assert!(matches!(e.kind, TarErrorKind::TooManyEntries { max: 2 }));
        assert!(e.to_string().contains("entry `c`"), "{e}");
        let h = ustar(b"p", b'x', 2 << 20);
        let bytes = Ar::default().raw(&h, b"").end();
        assert!(matches!(
            err(&bytes),
            TarErrorKind::ExtensionTooLarge { .. }
        ));
    }

    /// A small archive using most features, with the offsets of its header blocks.
    fn feature_archive() -> (Vec<u8>, Vec<usize>) {
        let mut a = Ar::default();
        let mut headers = Vec::new();
        let mark = |a: &Ar, headers: &mut Vec<usize>| headers.push(a.0.len());
        mark(&a, &mut headers);
        a.pax(
            b'x',
            &[
                ("path", b"usr/lib/long-name"),
                ("SCHILY.xattr.user.x", b"v"),
            ],
        );
        mark(&a, &mut headers);
        a.file("x", b"content");
        for (name, typ, link) in [
            ("usr/", b'5', ""),
            ("bin", b'2', "usr/bin"),
            ("bin/sh", b'0', ""),
            ("usr/bin/ash", b'1', "usr/bin/sh"),
            ("etc/.wh.passwd", b'0', ""),
            ("var/.wh..wh..opq", b'0', ""),
            ("dev/null", b'3', ""),
            ("up", b'2', ".."),
            ("up/up/x/", 0, ""),
        ] {
            mark(&a, &mut headers);
            a.entry(name, typ, link);
        }
        (a.end(), headers)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]
        /// Hostile variations of a valid archive (fields changed, checksums made valid again,
        /// the stream cut anywhere) are parsed or refused, and merged or refused, never panic.
        #[test]
        fn mutated_archives_never_panic(
            flips in proptest::collection::vec((0usize..BLOCK, proptest::prelude::any::<u8>(), 0usize..16), 0..12),
            cut in proptest::prelude::any::<u16>(),
        ) {
            let (mut bytes, headers) = feature_archive();
            for (offset, value, which) in flips {
                let at = headers[which % headers.len()] + offset;
                bytes[at] = value;
            }
            for &h in &headers {
                let block: &mut [u8] = &mut bytes[h..h + BLOCK];
                block[148..156].fill(b' ');
                let sum: u32 = block.iter().map(|&b| u32::from(b)).sum();
                block[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
            }
            let cut = usize::from(cut) % (bytes.len() + 1);
            let l = limits();
            if let Ok((entries, _)) = read_entries(&bytes[..cut], &l, &mut Discard) {
                let mut tree = crate::oci::tree::Tree::new(&l);
                for (i, e) in entries.into_iter().enumerate() {
                    if tree.apply(u32::from(i % 2 == 1), e).is_err() {
                        break;
                    }
                }
                let _ = tree.stats();
            }
        }
    }

    #[test]
    fn errors_name_the_entry_and_its_offset() {
        let bytes = Ar::default()
            .file("ok", b"")
            .file("a/../../etc/shadow", b"")
            .end();
        let e = read(&bytes).unwrap_err();
        assert_eq!(e.offset, 512);
        assert_eq!(
            e.to_string(),
            "entry `a/../../etc/shadow` (header at byte 512) contains a `..` component"
        );
    }
}
