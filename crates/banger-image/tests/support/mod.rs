//! Shared helpers for the flattening tests: crafting layer tars block by block, writing them as
//! blobs, watching canaries around the staging directory, and reading ext4 images back with
//! debugfs (no mount).
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use banger_image::oci::flatten::LayerInput;
use banger_image::oci::layer::Compression;
use banger_image::Sha256Digest;
use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

pub const BLOCK: usize = 512;

/// Fails loudly when a tool the tests need is missing (tests never skip).
pub fn require_tools(tools: &[(&str, &str)]) {
    for (tool, package) in tools {
        let found = std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
            .chain(["/usr/sbin".into(), "/sbin".into()])
            .any(|d| d.join(tool).is_file());
        assert!(
            found,
            "these tests need `{tool}`: apt-get install {package}"
        );
    }
}

pub fn require_e2fsprogs() {
    require_tools(&[
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("e2fsck", "e2fsprogs"),
    ]);
}

/// A tar archive under construction, header by header (so tests can write what no normal tar
/// writer would: `..`, bad sizes, odd types).
#[derive(Default, Clone)]
pub struct Tarball(pub Vec<u8>);

pub fn header(name: &[u8], typ: u8, size: u64, mode: u32) -> tar::Header {
    let mut h = tar::Header::new_ustar();
    assert!(name.len() <= 100, "use a PAX path for long names");
    h.as_old_mut().name[..name.len()].copy_from_slice(name);
    h.as_mut_bytes()[156] = typ;
    h.set_size(size);
    h.set_mode(mode);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(1_600_000_000);
    h.set_cksum();
    h
}

impl Tarball {
    pub fn raw(&mut self, h: &tar::Header, data: &[u8]) -> &mut Self {
        self.0.extend_from_slice(h.as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(BLOCK), 0);
        self
    }
    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.file_as(name, data, 0o644, 0, 0)
    }
    pub fn file_as(&mut self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = header(name.as_bytes(), b'0', data.len() as u64, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_cksum();
        self.raw(&h, data)
    }
    pub fn dir(&mut self, name: &str, mode: u32) -> &mut Self {
        self.dir_as(name, mode, 0, 0)
    }
    pub fn dir_as(&mut self, name: &str, mode: u32, uid: u64, gid: u64) -> &mut Self {
        let mut h = header(name.as_bytes(), b'5', 0, mode);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_cksum();
        self.raw(&h, b"")
    }
    pub fn link(&mut self, name: &str, typ: u8, target: &str) -> &mut Self {
        self.link_as(name, typ, target, 0o777)
    }
    pub fn link_as(&mut self, name: &str, typ: u8, target: &str, mode: u32) -> &mut Self {
        let mut h = header(name.as_bytes(), typ, 0, mode);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.raw(&h, b"")
    }
    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        self.link(name, b'2', target)
    }
    /// A hardlink; its mode becomes the shared inode's (as after `link` + `chmod`).
    pub fn hardlink(&mut self, name: &str, target: &str, mode: u32) -> &mut Self {
        self.link_as(name, b'1', target, mode)
    }
    pub fn device(&mut self, name: &str, typ: u8, major: u32, minor: u32, mode: u32) -> &mut Self {
        let mut h = header(name.as_bytes(), typ, 0, mode);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        h.set_cksum();
        self.raw(&h, b"")
    }
    /// A PAX extended header (`x`) for the next entry.
    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let data = pax_data(records);
        let h = header(b"././@PaxHeader", b'x', data.len() as u64, 0o644);
        self.raw(&h, &data)
    }
    /// A file whose name comes from a PAX record (any bytes but NUL).
    pub fn pax_file(&mut self, name: &[u8], data: &[u8], mode: u32) -> &mut Self {
        self.pax(&[("path", name)]);
        let h = header(b"placeholder", b'0', data.len() as u64, mode);
        self.raw(&h, data)
    }
    pub fn finish(&mut self) -> Vec<u8> {
        let mut out = std::mem::take(&mut self.0);
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
        out
    }
}

/// The data of a PAX extended header: `LEN KEY=VALUE\n` records.
pub fn pax_data(records: &[(&str, &[u8])]) -> Vec<u8> {
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
    data
}

/// A gzip layer written to a file as it is generated, for layers too large to hold in memory;
/// the tar is hashed on the way (its diff_id).
pub struct LayerWriter {
    enc: flate2::write::GzEncoder<std::io::BufWriter<std::fs::File>>,
    diff_id: sha2::Sha256,
    path: PathBuf,
}

impl LayerWriter {
    pub fn create(path: &Path) -> Self {
        let file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
        Self {
            enc: flate2::write::GzEncoder::new(file, flate2::Compression::fast()),
            diff_id: sha2::Sha256::default(),
            path: path.to_owned(),
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        use sha2::Digest;
        self.diff_id.update(bytes);
        self.enc.write_all(bytes).unwrap();
    }

    pub fn raw(&mut self, h: &tar::Header, data: &[u8]) -> &mut Self {
        self.put(h.as_bytes());
        self.put(data);
        let pad = (BLOCK - data.len() % BLOCK) % BLOCK;
        self.put(&[0u8; BLOCK][..pad]);
        self
    }

    pub fn pax(&mut self, records: &[(&str, &[u8])]) -> &mut Self {
        let data = pax_data(records);
        let h = header(b"././@PaxHeader", b'x', data.len() as u64, 0o644);
        self.raw(&h, &data)
    }

    pub fn file(&mut self, name: &str, data: &[u8]) -> &mut Self {
        self.raw(
            &header(name.as_bytes(), b'0', data.len() as u64, 0o644),
            data,
        )
    }

    pub fn dir(&mut self, name: &str) -> &mut Self {
        self.raw(&header(name.as_bytes(), b'5', 0, 0o755), b"")
    }

    pub fn symlink(&mut self, name: &str, target: &str) -> &mut Self {
        let mut h = header(name.as_bytes(), b'2', 0, 0o777);
        h.as_old_mut().linkname[..target.len()].copy_from_slice(target.as_bytes());
        h.set_cksum();
        self.raw(&h, b"")
    }

    /// Ends the archive and the gzip stream; the blob as a flatten input.
    pub fn finish(mut self) -> LayerInput {
        use sha2::Digest;
        self.put(&[0u8; 2 * BLOCK]);
        self.enc.finish().unwrap().flush().unwrap();
        let diff_id = hex::encode(self.diff_id.finalize()).parse().unwrap();
        let mut blob = sha2::Sha256::default();
        std::io::copy(&mut std::fs::File::open(&self.path).unwrap(), &mut blob).unwrap();
        LayerInput {
            path: self.path,
            compression: Compression::Gzip,
            digest: hex::encode(blob.finalize()).parse().unwrap(),
            diff_id,
        }
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    e.write_all(data).unwrap();
    e.finish().unwrap()
}

pub fn zstd(data: &[u8]) -> Vec<u8> {
    zstd::encode_all(data, 3).unwrap()
}

/// Writes `tar` as a blob compressed with `c` into `dir`, named by a counter (never by digest).
pub fn blob(dir: &Path, tar: &[u8], c: Compression) -> LayerInput {
    let bytes = match c {
        Compression::Gzip => gzip(tar),
        Compression::Zstd => zstd(tar),
        Compression::None => tar.to_vec(),
    };
    blob_raw(dir, &bytes, c, Sha256Digest::of_bytes(tar))
}

pub fn blob_raw(dir: &Path, bytes: &[u8], c: Compression, diff_id: Sha256Digest) -> LayerInput {
    std::fs::create_dir_all(dir).unwrap();
    let n = std::fs::read_dir(dir).unwrap().count();
    let path = dir.join(format!("blob{n}"));
    std::fs::write(&path, bytes).unwrap();
    LayerInput {
        path,
        compression: c,
        digest: Sha256Digest::of_bytes(bytes),
        diff_id,
    }
}

/// Everything under a directory, with content, for before/after comparisons.
#[derive(Debug, PartialEq, Eq)]
pub struct Snap {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    mtime: i64,
    content: Vec<u8>,
}

pub fn snapshot(root: &Path, skip: &[&Path]) -> BTreeMap<PathBuf, Snap> {
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(p) = stack.pop() {
        if skip.iter().any(|s| *s == p) {
            continue;
        }
        let m = std::fs::symlink_metadata(&p).unwrap();
        let ft = m.file_type();
        let (kind, content) = if ft.is_symlink() {
            (
                "symlink",
                std::fs::read_link(&p)
                    .unwrap()
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            )
        } else if ft.is_dir() {
            for e in std::fs::read_dir(&p).unwrap() {
                stack.push(e.unwrap().path());
            }
            ("dir", Vec::new())
        } else if ft.is_file() {
            ("file", std::fs::read(&p).unwrap())
        } else {
            ("other", Vec::new())
        };
        out.insert(
            p,
            Snap {
                kind,
                mode: m.permissions().mode(),
                uid: m.uid(),
                gid: m.gid(),
                // A directory's mtime follows its entries, which the listing shows already (and
                // the staging directory comes and goes next to the output).
                mtime: if kind == "dir" { 0 } else { m.mtime() },
                content,
            },
        );
    }
    out
}

/// A scratch directory with canaries a hostile layer might aim at: files and directories next
/// to the staging directory and the output, with known content, modes and times.
pub struct Arena {
    pub dir: tempfile::TempDir,
    pub staging: PathBuf,
    pub out: PathBuf,
    pub blobs: PathBuf,
    before: BTreeMap<PathBuf, Snap>,
}

impl Arena {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir(root.join("canary_dir")).unwrap();
        std::fs::write(root.join("canary_dir/inside"), "canary inside\n").unwrap();
        std::fs::write(root.join("canary_file"), "canary\n").unwrap();
        std::fs::set_permissions(root.join("canary_file"), PermissionsExt::from_mode(0o640))
            .unwrap();
        std::fs::set_permissions(root.join("canary_dir"), PermissionsExt::from_mode(0o750))
            .unwrap();
        // The staging directory's future siblings a `..` would reach.
        std::fs::create_dir(root.join("work")).unwrap();
        std::fs::write(root.join("work/canary"), "work canary\n").unwrap();
        std::os::unix::fs::symlink("/etc/hostname", root.join("canary_link")).unwrap();
        let blobs = root.join("blobs");
        std::fs::create_dir(&blobs).unwrap();
        Self {
            staging: root.join("work/staging"),
            out: root.join("work/root.ext4"),
            blobs,
            before: BTreeMap::new(),
            dir,
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    /// Absolute path of a canary, for layers that aim at it.
    pub fn canary(&self, name: &str) -> String {
        self.root().join(name).display().to_string()
    }

    /// Records the state of everything but the output; call after writing the blobs.
    pub fn seal(&mut self) {
        self.before = snapshot(self.root(), &[&self.out]);
    }

    /// Like [`Arena::assert_untouched`], for a test that planted something at the staging path.
    pub fn assert_untouched_but_staging(&self) {
        let after = snapshot(self.root(), &[&self.out]);
        assert_eq!(self.before, after, "something outside the image changed");
    }

    /// Asserts nothing outside the image changed: canaries intact, no new files but the
    /// output, staging gone.
    pub fn assert_untouched(&self) {
        assert!(!self.staging.exists(), "staging directory left behind");
        let after = snapshot(self.root(), &[&self.out]);
        assert_eq!(self.before, after, "something outside the image changed");
    }
}

/// One entry of an ext4 image as read back with debugfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    pub kind: char,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Regular files only.
    pub size: u64,
    pub target: Option<Vec<u8>>,
    pub rdev: Option<(u32, u32)>,
    pub ino: u32,
}

fn debugfs(img: &Path, request: &[u8]) -> Vec<u8> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(std::ffi::OsStr::from_bytes(request))
        .arg(img)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let complaints: Vec<&str> = stderr.lines().skip(1).filter(|l| !l.is_empty()).collect();
    assert!(
        out.status.success() && complaints.is_empty(),
        "debugfs {:?}: {stderr}",
        String::from_utf8_lossy(request)
    );
    out.stdout
}

fn quoted(path: &[u8]) -> Vec<u8> {
    banger_image::oci::ext4::quote(path)
}

/// `ls -p` of one directory: (name, ino, mode, uid, gid, size).
pub fn ls(img: &Path, dir: &[u8]) -> Vec<(Vec<u8>, u32, u32, u32, u32, u64)> {
    let out = debugfs(img, &[b"ls -p ", quoted(dir).as_slice()].concat());
    let mut entries = Vec::new();
    for line in out.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
        // /INO/MODE/UID/GID/NAME/SIZE/ (names cannot hold `/` or newlines)
        let f: Vec<&[u8]> = line.split(|&b| b == b'/').collect();
        assert_eq!(f.len(), 8, "{}", String::from_utf8_lossy(line));
        let num =
            |b: &[u8], radix| u64::from_str_radix(std::str::from_utf8(b).unwrap(), radix).unwrap();
        let name = f[5].to_vec();
        if name == b"." || name == b".." {
            continue;
        }
        let size = if f[6].is_empty() { 0 } else { num(f[6], 10) };
        entries.push((
            name,
            num(f[1], 10) as u32,
            num(f[2], 8) as u32,
            num(f[3], 10) as u32,
            num(f[4], 10) as u32,
            size,
        ));
    }
    entries
}

pub fn stat(img: &Path, path: &[u8]) -> String {
    String::from_utf8_lossy(&debugfs(img, &[b"stat ", quoted(path).as_slice()].concat()))
        .into_owned()
}

pub fn cat(img: &Path, path: &[u8]) -> Vec<u8> {
    debugfs(img, &[b"cat ", quoted(path).as_slice()].concat())
}

/// Every entry of the image but `/` and `/lost+found`, by absolute path.
pub fn read_image(img: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![b"/".to_vec()];
    while let Some(dir) = dirs.pop() {
        for (name, ino, mode, uid, gid, size) in ls(img, &dir) {
            let path = if dir == b"/" {
                [b"/", name.as_slice()].concat()
            } else {
                [dir.as_slice(), b"/", name.as_slice()].concat()
            };
            if path == b"/lost+found" {
                continue;
            }
            let kind = match mode & 0o170000 {
                0o040000 => 'd',
                0o100000 => 'f',
                0o120000 => 'l',
                0o020000 => 'c',
                0o060000 => 'b',
                0o010000 => 'p',
                0o140000 => 's',
                other => panic!("unknown mode {other:o}"),
            };
            let mut node = Node {
                kind,
                mode: mode & 0o7777,
                uid,
                gid,
                size: if kind == 'f' { size } else { 0 },
                target: None,
                rdev: None,
                ino,
            };
            match kind {
                'd' => dirs.push(path.clone()),
                'l' => {
                    // `Fast link dest: "TARGET"` holds the raw bytes; slow links need `cat`.
                    let raw = debugfs(img, &[b"stat ", quoted(&path).as_slice()].concat());
                    let fast = raw.split(|&b| b == b'\n').find_map(|l| {
                        let l = l.trim_ascii_start().strip_prefix(b"Fast link dest: \"")?;
                        l.strip_suffix(b"\"")
                    });
                    node.target = Some(match fast {
                        Some(t) => t.to_vec(),
                        None => cat(img, &path),
                    });
                }
                'c' | 'b' => {
                    let s = stat(img, &path);
                    let dev = s
                        .lines()
                        .find_map(|l| l.split("Device major/minor number: ").nth(1))
                        .unwrap();
                    let dec = dev.split(' ').next().unwrap();
                    let (ma, mi) = dec.split_once(':').unwrap();
                    node.rdev = Some((ma.parse().unwrap(), mi.parse().unwrap()));
                }
                _ => {}
            }
            out.insert(path, node);
        }
    }
    out
}

/// `e2fsck -fn` must pass on every image the tests build.
pub fn assert_fsck_clean(img: &Path) {
    let out = Command::new("e2fsck").arg("-fn").arg(img).output().unwrap();
    assert!(
        out.status.success(),
        "e2fsck -fn {}: {}\n{}",
        img.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Writes an OCI image layout at `dir` holding one image tagged `tag` made of `layers`
/// (uncompressed tars, stored with `compression`); returns the blobs as flatten inputs.
pub fn oci_layout(dir: &Path, tag: &str, layers: &[(Vec<u8>, Compression)]) -> Vec<LayerInput> {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |bytes: &[u8]| -> (String, usize, PathBuf) {
        let d = Sha256Digest::of_bytes(bytes).to_string();
        let p = blobs.join(&d);
        std::fs::write(&p, bytes).unwrap();
        (format!("sha256:{d}"), bytes.len(), p)
    };
    let mut inputs = Vec::new();
    let mut descs = Vec::new();
    let mut diff_ids = Vec::new();
    for (tar, c) in layers {
        let (bytes, media) = match c {
            Compression::Gzip => (gzip(tar), "application/vnd.oci.image.layer.v1.tar+gzip"),
            Compression::Zstd => (zstd(tar), "application/vnd.oci.image.layer.v1.tar+zstd"),
            Compression::None => (tar.clone(), "application/vnd.oci.image.layer.v1.tar"),
        };
        let (digest, size, path) = put(&bytes);
        let diff_id = Sha256Digest::of_bytes(tar);
        descs.push(serde_json::json!({"mediaType": media, "digest": digest, "size": size}));
        diff_ids.push(format!("sha256:{diff_id}"));
        inputs.push(LayerInput {
            path,
            compression: *c,
            digest: Sha256Digest::of_bytes(&bytes),
            diff_id,
        });
    }
    let config = serde_json::json!({
        "architecture": "amd64",
        "os": "linux",
        "config": {},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    });
    let (cd, cs, _) = put(&serde_json::to_vec(&config).unwrap());
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": cd, "size": cs},
        "layers": descs,
    });
    let (md, ms, _) = put(&serde_json::to_vec(&manifest).unwrap());
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": md,
            "size": ms,
            "annotations": {"org.opencontainers.image.ref.name": tag},
        }],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    inputs
}

/// Every entry under `root` (not `root` itself), read with lstat, in the shape of [`read_image`]
/// (with the host inode number, so hardlinks can be grouped).
pub fn read_tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    use std::os::unix::fs::FileTypeExt;
    let mut out = BTreeMap::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let kind = if ft.is_dir() {
                stack.push(p.clone());
                'd'
            } else if ft.is_symlink() {
                'l'
            } else if ft.is_file() {
                'f'
            } else if ft.is_char_device() {
                'c'
            } else if ft.is_block_device() {
                'b'
            } else if ft.is_fifo() {
                'p'
            } else {
                's'
            };
            let rel = p.strip_prefix(root).unwrap().as_os_str().as_bytes();
            let rdev = m.rdev();
            out.insert(
                [b"/", rel].concat(),
                Node {
                    kind,
                    mode: m.mode() & 0o7777,
                    uid: m.uid(),
                    gid: m.gid(),
                    size: if kind == 'f' { m.size() } else { 0 },
                    target: (kind == 'l').then(|| {
                        std::fs::read_link(&p)
                            .unwrap()
                            .as_os_str()
                            .as_bytes()
                            .to_vec()
                    }),
                    rdev: matches!(kind, 'c' | 'b').then(|| {
                        (
                            ((rdev >> 8) & 0xfff) as u32,
                            ((rdev & 0xff) | ((rdev >> 12) & 0xfff00)) as u32,
                        )
                    }),
                    ino: m.ino() as u32,
                },
            );
        }
    }
    out
}

/// Groups of paths sharing an inode (hardlinks), as sorted lists.
pub fn link_groups(nodes: &BTreeMap<Vec<u8>, Node>) -> Vec<Vec<Vec<u8>>> {
    let mut by_ino: BTreeMap<u32, Vec<Vec<u8>>> = BTreeMap::new();
    for (p, n) in nodes {
        if n.kind != 'd' {
            by_ino.entry(n.ino).or_default().push(p.clone());
        }
    }
    let mut groups: Vec<Vec<Vec<u8>>> = by_ino.into_values().filter(|g| g.len() > 1).collect();
    groups.sort();
    groups
}
