//! Flattening layers into ext4 with real parts: real gzip/zstd blobs, real mkfs.ext4 and
//! debugfs, read back with debugfs and checked with `e2fsck -fn`; the hostile-layer corpus with
//! canaries around the staging directory; GNU tar as the reference for what an archive holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use banger_image::oci::flatten::{flatten_to_ext4, FlattenError, FlattenStats, LayerInput, Limits};
use banger_image::oci::layer::Compression;
use banger_image::{RecordingProgress, Sha256Digest};
use std::collections::BTreeMap;
use std::os::unix::ffi::OsStrExt;
use std::time::Instant;
use support::*;

fn flatten(arena: &Arena, layers: &[LayerInput]) -> Result<FlattenStats, FlattenError> {
    flatten_with(arena, layers, &Limits::default())
}

fn flatten_with(
    arena: &Arena,
    layers: &[LayerInput],
    limits: &Limits,
) -> Result<FlattenStats, FlattenError> {
    require_e2fsprogs();
    flatten_to_ext4(
        layers,
        &arena.out,
        limits,
        &arena.staging,
        &RecordingProgress::new(),
    )
}

/// Flattens, expects success, checks the image and the canaries, and reads the image back.
fn ok(arena: &mut Arena, layers: &[LayerInput]) -> BTreeMap<Vec<u8>, Node> {
    arena.seal();
    let stats = flatten(arena, layers).unwrap_or_else(|e| panic!("{}", chain(&e)));
    assert!(stats.ext4_bytes > 0);
    assert_fsck_clean(&arena.out);
    arena.assert_untouched();
    read_image(&arena.out)
}

/// Flattens, expects a refusal, checks that nothing was left behind; returns the message chain.
fn refused(arena: &mut Arena, layers: &[LayerInput]) -> String {
    refused_with(arena, layers, &Limits::default())
}

fn refused_with(arena: &mut Arena, layers: &[LayerInput], limits: &Limits) -> String {
    arena.seal();
    let err = match flatten_with(arena, layers, limits) {
        Ok(_) => panic!(
            "hostile layer accepted: {:?}",
            read_image(&arena.out).keys().collect::<Vec<_>>()
        ),
        Err(e) => e,
    };
    assert!(!arena.out.exists(), "output left behind after a refusal");
    arena.assert_untouched();
    chain(&err)
}

/// The error as the daemon shows it: the chain, then each hint on a `hint:` line.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    banger_hint::Report::new(e, &[banger_image::HINTS]).to_string()
}

fn one_layer(arena: &Arena, tar: &[u8]) -> Vec<LayerInput> {
    vec![blob(&arena.blobs, tar, Compression::Gzip)]
}

fn path(s: &str) -> Vec<u8> {
    s.as_bytes().to_vec()
}

#[test]
fn layers_flatten_into_a_clean_ext4_with_metadata_and_content() {
    let mut arena = Arena::new();
    let base = Tarball::default()
        .dir("etc", 0o755)
        .file_as("etc/shadow", b"root:*:1::::::\n", 0o640, 0, 42)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .file_as("usr/bin/su", b"#!su\n", 0o4755, 0, 0)
        .hardlink("usr/bin/su2", "usr/bin/su", 0o4755)
        .symlink("bin", "usr/bin")
        .device("null", b'3', 1, 3, 0o666)
        .device("sda", b'4', 8, 0, 0o660)
        .device("big", b'3', 4095, 1_048_575, 0o600)
        .link("fifo", b'6', "")
        .dir_as("home", 0o2775, 1000, 1001)
        .file("empty", b"")
        .pax(&[("uid", b"1000"), ("gid", b"70000")])
        .symlink("owned_link", "/etc/../etc/shadow")
        .finish();
    let upper = Tarball::default()
        .file("bin/tool", b"tool\n")
        .file("etc/.wh.shadow", b"")
        .finish();
    let layers = vec![
        blob(&arena.blobs, &base, Compression::Gzip),
        blob(&arena.blobs, &upper, Compression::Zstd),
    ];
    let img = ok(&mut arena, &layers);
    let n = |p: &str| {
        img.get(p.as_bytes())
            .unwrap_or_else(|| panic!("{p} missing: {img:?}"))
    };
    assert!(!img.contains_key(&path("/etc/shadow")));
    assert_eq!((n("/usr/bin/su").mode, n("/usr/bin/su").size), (0o4755, 5));
    assert_eq!(n("/usr/bin/su").ino, n("/usr/bin/su2").ino);
    assert!(stat(&arena.out, b"/usr/bin/su").contains("Links: 2"));
    assert_eq!(n("/bin").target.as_deref(), Some(&b"usr/bin"[..]));
    assert_eq!(cat(&arena.out, b"/usr/bin/tool"), b"tool\n");
    assert_eq!(
        (n("/null").kind, n("/null").rdev, n("/null").mode),
        ('c', Some((1, 3)), 0o666)
    );
    assert_eq!((n("/sda").kind, n("/sda").rdev), ('b', Some((8, 0))));
    assert_eq!(n("/big").rdev, Some((4095, 1_048_575)));
    assert_eq!(n("/fifo").kind, 'p');
    assert_eq!(
        (n("/home").mode, n("/home").uid, n("/home").gid),
        (0o2775, 1000, 1001)
    );
    assert_eq!((n("/empty").kind, n("/empty").size), ('f', 0));
    // `sif` on a symlink changes the link, never what it points to.
    let link = n("/owned_link");
    assert_eq!((link.uid, link.gid), (1000, 70000));
    assert_eq!(link.target.as_deref(), Some(&b"/etc/../etc/shadow"[..]));
}

// ---- The hostile-layer corpus (issue 9, "Flattening that cannot escape"). ----

#[test]
fn dot_dot_names_are_refused() {
    for name in [
        "../canary_file",
        "a/../../work/canary",
        "./../../../tmp/x",
        "d/..",
    ] {
        let mut arena = Arena::new();
        let tar = Tarball::default().file(name, b"pwned\n").finish();
        let layers = one_layer(&arena, &tar);
        let msg = refused(&mut arena, &layers);
        assert!(msg.contains("contains a `..` component"), "{msg}");
        assert!(msg.contains(&format!("entry `{name}`")), "{msg}");
        assert!(msg.contains("layer 1/1"), "{msg}");
    }
}

#[test]
fn absolute_names_land_inside_the_image() {
    let mut arena = Arena::new();
    let target = arena.canary("canary_file");
    let tar = Tarball::default()
        .pax_file(target.as_bytes(), b"pwned\n", 0o644)
        .file("/etc/motd", b"hi\n")
        .finish();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    assert_eq!(cat(&arena.out, target.as_bytes()), b"pwned\n");
    assert!(img.contains_key(&path("/etc/motd")));
}

#[test]
fn a_symlink_to_a_host_path_then_a_write_through_it_stays_inside() {
    let mut arena = Arena::new();
    let dir = arena.canary("canary_dir");
    let tar = Tarball::default()
        .symlink("evil", &dir)
        .file("evil/inside", b"pwned\n")
        .file("evil/new", b"pwned\n")
        .symlink("evil_file", &arena.canary("canary_file"))
        .finish();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    // The writes went to the image's own copy of that path.
    assert_eq!(
        cat(&arena.out, format!("{dir}/inside").as_bytes()),
        b"pwned\n"
    );
    assert_eq!(img[&path("/evil")].target.as_deref(), Some(dir.as_bytes()));
    assert_eq!(img[&path("/evil_file")].kind, 'l');
}

#[test]
fn a_symlink_then_a_same_named_directory_does_not_chmod_outside() {
    let mut arena = Arena::new();
    let dir = arena.canary("canary_dir");
    let tar = Tarball::default()
        .symlink("evil", &dir)
        .dir_as("evil", 0o777, 1234, 1234)
        .file("evil/x", b"x")
        .finish();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    let evil = &img[&path("/evil")];
    assert_eq!((evil.kind, evil.mode, evil.uid), ('d', 0o777, 1234));
    assert!(img.contains_key(&path("/evil/x")));
}

#[test]
fn a_symlink_to_dot_dot_then_nested_directories_stay_inside() {
    let mut arena = Arena::new();
    let tar = Tarball::default()
        .symlink("up", "..")
        .symlink("way_up", "../../../../../../..")
        .dir("up/up/up/work", 0o777)
        .file("up/up/work/canary", b"pwned\n")
        .file("way_up/canary_file", b"pwned\n")
        .finish();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    assert_eq!(cat(&arena.out, b"/work/canary"), b"pwned\n");
    assert_eq!(cat(&arena.out, b"/canary_file"), b"pwned\n");
    assert_eq!(img[&path("/work")].mode, 0o777);
}

#[test]
fn hardlinks_to_host_paths_missing_entries_and_directories_are_refused() {
    let canary = Arena::new().canary("canary_file");
    for (target, want) in [
        (canary.as_str(), "does not exist in the image"),
        ("../canary_file", "contains a `..` component"),
        ("missing", "does not exist in the image"),
        ("d", "which is a directory"),
        ("/", "hardlink to the image root"),
    ] {
        let mut arena = Arena::new();
        let tar = Tarball::default()
            .dir("d", 0o755)
            .hardlink("l", target, 0o644)
            .finish();
        let layers = one_layer(&arena, &tar);
        let msg = refused(&mut arena, &layers);
        assert!(msg.contains(want), "{target}: {msg}");
    }
}

#[test]
fn the_root_replaced_by_a_symlink_is_refused() {
    for name in ["./", ".", "/"] {
        let mut arena = Arena::new();
        let dir = arena.canary("canary_dir");
        let tar = Tarball::default()
            .symlink(name, &dir)
            .file("inside", b"pwned\n")
            .finish();
        let layers = one_layer(&arena, &tar);
        let msg = refused(&mut arena, &layers);
        assert!(msg.contains("replace the image root"), "{msg}");
    }
}

#[test]
fn a_bare_whiteout_is_refused() {
    for name in [".wh.", "etc/.wh."] {
        let mut arena = Arena::new();
        let tar = Tarball::default()
            .dir("etc", 0o755)
            .file(name, b"")
            .finish();
        let layers = one_layer(&arena, &tar);
        let msg = refused(&mut arena, &layers);
        assert!(
            msg.contains("whiteout (`.wh.`) that names nothing"),
            "{msg}"
        );
    }
}

#[test]
fn whiteouts_through_symlinks_resolve_inside_the_image() {
    let mut arena = Arena::new();
    let dir = arena.canary("canary_dir");
    let lower = Tarball::default()
        .dir("etc", 0o755)
        .file("etc/passwd", b"root\n")
        .symlink("l", "/etc")
        .symlink("host", &dir)
        .finish();
    let upper = Tarball::default()
        .file("l/.wh.passwd", b"")
        .file("host/.wh.inside", b"")
        .file("host/.wh..wh..opq", b"")
        .finish();
    let layers = vec![
        blob(&arena.blobs, &lower, Compression::Gzip),
        blob(&arena.blobs, &upper, Compression::Gzip),
    ];
    let img = ok(&mut arena, &layers);
    assert!(!img.contains_key(&path("/etc/passwd")));
    assert!(img.contains_key(&path("/etc")));
}

#[test]
fn a_name_with_a_newline_is_refused() {
    for name in [&b"etc/pass\nwd"[..], b"a\rb"] {
        let mut arena = Arena::new();
        let tar = Tarball::default().pax_file(name, b"x", 0o644).finish();
        let layers = one_layer(&arena, &tar);
        let msg = refused(&mut arena, &layers);
        assert!(msg.contains("newline, carriage return or NUL"), "{msg}");
        assert!(
            msg.contains("entry `etc/pass\\nwd`") || msg.contains("entry `a\\rb`"),
            "{msg}"
        );
    }
    // The same in a symlink target.
    let mut arena = Arena::new();
    let tar = Tarball::default()
        .pax(&[("linkpath", b"a\nsif / mode 0777")])
        .link("l", b'2', "")
        .finish();
    let layers = one_layer(&arena, &tar);
    let msg = refused(&mut arena, &layers);
    assert!(msg.contains("newline"), "{msg}");
}

/// Names debugfs's parser could misread: every one must come back exactly, none may act.
const HOSTILE_NAMES: &[&[u8]] = &[
    b"a \"quoted\" name",
    b"\"",
    b"\"\"",
    b"sp ace",
    b"tab\there",
    b"<12>",
    b"<2>",
    b"semi;colon",
    b"#hash",
    b"!touch pwned",
    b"-x",
    b"--help",
    b"back\\slash\\",
    b"\xff\xfe not utf-8 \x80",
    b"caf\xc3\xa9",
    b"write",
    b"trailing space ",
    b" leading space",
    b"%s%n",
    b"$(touch pwned)",
];

#[test]
fn hostile_names_round_trip_exactly_and_inject_nothing() {
    let mut arena = Arena::new();
    let mut t = Tarball::default();
    t.dir("d", 0o755);
    let long = [b"\"".repeat(100), b"x".repeat(155)].concat();
    let mut names: Vec<Vec<u8>> = HOSTILE_NAMES.iter().map(|n| n.to_vec()).collect();
    names.push(long);
    names.push(b"y".repeat(255));
    for (i, n) in names.iter().enumerate() {
        let p = [b"d/", n.as_slice()].concat();
        match i % 4 {
            0 => t.pax_file(&p, n, 0o600),
            1 => t.pax(&[("path", &p), ("linkpath", n)]).link("x", b'2', ""),
            2 => t
                .pax(&[("path", &p)])
                .raw(&header(b"x", b'5', 0, 0o711), b""),
            _ => t
                .pax(&[("path", &p)])
                .raw(&header(b"x", b'6', 0, 0o644), b""),
        };
        // A hardlink and an xattr through the same hostile name.
        if i == 0 {
            t.pax(&[("path", &p), ("SCHILY.xattr.user.\"quoted\" x", n)])
                .raw(&header(b"x", b'0', 0, 0o600), b"");
            t.pax(&[("path", b"d/link"), ("linkpath", &p)])
                .hardlink("x", "", 0o600);
        }
    }
    let tar = t.finish();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    let listed: Vec<Vec<u8>> = ls(&arena.out, b"/d").into_iter().map(|e| e.0).collect();
    let mut want = names.clone();
    want.push(b"link".to_vec());
    want.sort();
    let mut got = listed.clone();
    got.sort();
    assert_eq!(
        got.iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect::<Vec<_>>(),
        want.iter()
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect::<Vec<_>>()
    );
    assert_eq!(got, want);
    for (i, n) in names.iter().enumerate() {
        let p = [b"/d/", n.as_slice()].concat();
        let node = &img[&p];
        match i % 4 {
            0 => assert_eq!((node.kind, node.mode), ('f', 0o600)),
            1 => assert_eq!(node.target.as_deref(), Some(n.as_slice())),
            2 => assert_eq!((node.kind, node.mode), ('d', 0o711)),
            _ => assert_eq!(node.kind, 'p'),
        }
    }
    let first = [b"/d/", names[0].as_slice()].concat();
    assert_eq!(img[&path("/d/link")].ino, img[&first].ino);
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(std::ffi::OsStr::from_bytes(
            &[
                b"ea_list ",
                banger_image::oci::ext4::quote(&first).as_slice(),
            ]
            .concat(),
        ))
        .arg(&arena.out)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(
        listed.contains(r#"user.\"quoted\" x (15) = "a \"quoted\" name""#),
        "{listed}"
    );
    assert!(!arena.root().join("pwned").exists());
}

#[test]
fn commands_at_debugfs_line_limit_work_and_longer_ones_are_refused() {
    use banger_image::oci::ext4::MAX_LINE;
    // A 4095-byte symlink target (the most ext4 stores) made of enough `"` to hit the limit.
    let target_for = |len: usize| {
        // `symlink "n" ` is 12 bytes, the quoted target 2 + 4095 + one per quote.
        let quotes = len - 12 - 2 - 4095;
        let mut t = b"\"".repeat(quotes);
        t.extend(b"x".repeat(4095 - quotes));
        t
    };
    let fits = target_for(MAX_LINE);
    assert_eq!(12 + banger_image::oci::ext4::quote(&fits).len(), MAX_LINE);
    let mut arena = Arena::new();
    let tar = Tarball::default()
        .pax(&[("linkpath", &fits)])
        .link("n", b'2', "")
        .finish();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    assert_eq!(img[&path("/n")].target.as_deref(), Some(fits.as_slice()));

    let mut arena = Arena::new();
    let too_long = target_for(MAX_LINE + 1);
    let tar = Tarball::default()
        .pax(&[("linkpath", &too_long)])
        .link("n", b'2', "")
        .finish();
    let layers = one_layer(&arena, &tar);
    let msg = refused(&mut arena, &layers);
    assert!(
        msg.contains("entry `/n` cannot be written") && msg.contains("line limit"),
        "{msg}"
    );
    assert!(
        msg.contains("\nhint: the image has an entry ext4 (or debugfs) cannot hold"),
        "{msg}"
    );
}

#[test]
fn pax_and_ustar_sizes_that_disagree_list_like_gnu_tar() {
    require_tools(&[("tar", "tar")]);
    // Data that looks like a header, hidden by a PAX size larger than the ustar size, and the
    // opposite; plus the header-only types whose size GNU tar ignores.
    let mut inner = Tarball::default();
    inner.file("smuggled", b"evil");
    let inner = inner.0;
    let mut dir_with_size = header(b"dir/", b'5', 512, 0o755);
    dir_with_size.set_cksum();
    let mut link_with_size = header(b"hard", b'1', 1024, 0o644);
    link_with_size.as_old_mut().linkname[..5].copy_from_slice(b"outer");
    link_with_size.set_cksum();
    let tar = Tarball::default()
        .pax(&[("size", inner.len().to_string().as_bytes())])
        .raw(&header(b"outer", b'0', 0, 0o644), &inner)
        .pax(&[("size", b"0")])
        .raw(&header(b"claims_data", b'0', 1024, 0o600), b"")
        .raw(&dir_with_size, b"")
        .raw(&link_with_size, b"")
        .file("last", b"end")
        .finish();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("layer.tar");
    std::fs::write(&file, &tar).unwrap();
    let out = std::process::Command::new("tar")
        .args(["--numeric-owner", "-tvf"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // `-rw-r--r-- 0/0 1024 2020-09-13 12:26 outer` -> (type, mode, size for files, name, link)
    let gnu: Vec<(char, String, Option<u64>, String, String)> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let kind = f[0].chars().next().unwrap();
            let size = (kind == '-').then(|| f[2].parse().unwrap());
            let link = f.get(6..).map(|r| r.join(" ")).unwrap_or_default();
            (
                kind,
                f[0][1..].to_string(),
                size,
                f[5].trim_end_matches('/').to_string(),
                link,
            )
        })
        .collect();
    let (ours, _) = banger_image::oci::tar::read_entries(
        &tar[..],
        &Limits::default(),
        &mut banger_image::oci::tar::Discard,
    )
    .unwrap();
    use banger_image::oci::tar::EntryKind;
    let ours: Vec<(char, String, Option<u64>, String, String)> = ours
        .iter()
        .map(|e| {
            let (kind, size, link) = match &e.kind {
                EntryKind::File(c) => ('-', Some(c.size()), String::new()),
                EntryKind::Dir => ('d', None, String::new()),
                EntryKind::Hardlink(t) => ('h', None, format!("link to {}", &t.to_string()[1..])),
                other => panic!("unexpected {other:?}"),
            };
            let perms: String = (0..9)
                .map(|i| {
                    let bit = e.meta.mode & (0o400 >> i) != 0;
                    if bit {
                        ['r', 'w', 'x'][i % 3]
                    } else {
                        '-'
                    }
                })
                .collect();
            (kind, perms, size, e.path.to_string()[1..].to_string(), link)
        })
        .collect();
    assert_eq!(ours, gnu);
    assert!(!ours.iter().any(|e| e.3 == "smuggled"));
    // And the image holds exactly those.
    let mut arena = Arena::new();
    let layers = one_layer(&arena, &tar);
    let img = ok(&mut arena, &layers);
    assert_eq!(
        img.keys()
            .map(|k| String::from_utf8_lossy(k).into_owned())
            .collect::<Vec<_>>(),
        ["/claims_data", "/dir", "/hard", "/last", "/outer"]
    );
    assert_eq!(cat(&arena.out, b"/outer"), inner);
}

/// A layer with one file of `size` zero bytes, compressed as a stream (never in memory), and
/// its diff_id.
fn bomb(c: Compression, size: u64) -> (Vec<u8>, Sha256Digest) {
    use sha2::Digest;
    use std::io::Write;
    let mut h = header(b"zeros", b'0', 0, 0o644);
    h.set_size(size);
    h.set_cksum();
    let chunk = vec![0u8; 1 << 20];
    let mut diff_id = sha2::Sha256::default();
    let mut write_all = |w: &mut dyn Write| {
        let mut put = |bytes: &[u8]| {
            diff_id.update(bytes);
            w.write_all(bytes).unwrap();
        };
        put(h.as_bytes());
        let mut left = size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            put(&chunk[..n]);
            left -= n as u64;
        }
        put(&[0u8; 1024]);
    };
    let bytes = match c {
        Compression::Gzip => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
            write_all(&mut e);
            e.finish().unwrap()
        }
        Compression::Zstd => {
            let mut e = zstd::stream::Encoder::new(Vec::new(), 19).unwrap();
            write_all(&mut e);
            e.finish().unwrap()
        }
        Compression::None => unreachable!(),
    };
    (bytes, hex::encode(diff_id.finalize()).parse().unwrap())
}

#[test]
fn decompression_bombs_stop_at_the_limit_fast() {
    for c in [Compression::Gzip, Compression::Zstd] {
        let mut arena = Arena::new();
        let (bytes, _) = bomb(c, 256 << 20);
        assert!(bytes.len() < 1 << 20, "{c}: {} bytes", bytes.len());
        let layer = blob_raw(&arena.blobs, &bytes, c, Sha256Digest::of_bytes(b"unknown"));
        let limits = Limits {
            max_layer_bytes: 16 << 20,
            ..Limits::default()
        };
        let start = Instant::now();
        let msg = refused_with(&mut arena, std::slice::from_ref(&layer), &limits);
        let took = start.elapsed();
        assert!(
            msg.contains("more than 16777216 bytes") && msg.contains("decompression bomb"),
            "{msg}"
        );
        assert!(took.as_secs() < 10, "{c} bomb took {took:?}");
        // The per-image budget counts all layers together: the first layer is fine, the
        // second goes over.
        let mut arena = Arena::new();
        let (bytes, diff_id) = bomb(c, 48 << 20);
        let a = blob_raw(&arena.blobs, &bytes, c, diff_id);
        let limits = Limits {
            max_image_bytes: 64 << 20,
            ..Limits::default()
        };
        let msg = refused_with(&mut arena, &[a.clone(), a], &limits);
        assert!(msg.contains("in total"), "{msg}");
    }
}

#[test]
fn digests_are_parsed_before_any_use_and_never_name_files() {
    for bad in [
        "sha256:../x",
        "../x",
        "sha256:",
        &format!("sha256:{}", "a".repeat(64)),
    ] {
        assert!(bad.parse::<Sha256Digest>().is_err(), "{bad}");
    }
    // Blobs are opened by the path the cache gives, verified by content: a blob whose bytes do
    // not match its digest is refused before anything of it is used.
    let mut arena = Arena::new();
    let tar = Tarball::default().file("a", b"a").finish();
    let mut layer = blob(&arena.blobs, &tar, Compression::Gzip);
    layer.digest = Sha256Digest::of_bytes(b"something else");
    let msg = refused(&mut arena, &[layer]);
    assert!(
        msg.contains("layer 1/1") && msg.contains("has digest sha256:"),
        "{msg}"
    );
    let mut arena = Arena::new();
    let mut layer = blob(&arena.blobs, &tar, Compression::Gzip);
    layer.diff_id = Sha256Digest::of_bytes(b"something else");
    let msg = refused(&mut arena, &[layer]);
    assert!(msg.contains("diff_id"), "{msg}");
    // A blob missing from the cache says how to get it back.
    let mut arena = Arena::new();
    let mut layer = blob(&arena.blobs, &tar, Compression::Gzip);
    std::fs::remove_file(&layer.path).unwrap();
    layer.path = arena.blobs.join("gone");
    let msg = refused(&mut arena, &[layer]);
    assert!(
        msg.contains("cannot open layer blob") && msg.contains("run `banger image pull` again"),
        "{msg}"
    );
}

// ---- Behaviour a user sees. ----

#[test]
fn times_zero_large_and_ordinary_are_kept() {
    let mut arena = Arena::new();
    let mut t = Tarball::default();
    for (name, mtime) in [
        ("zero", 0u64),
        ("y2038", 1u64 << 31),
        ("y2100", 4_102_444_800),
        ("now", 1_700_000_000),
    ] {
        let mut h = header(name.as_bytes(), b'0', 1, 0o644);
        h.set_mtime(mtime);
        h.set_cksum();
        t.raw(&h, b"x");
        let mut d = header(format!("{name}.d").as_bytes(), b'5', 0, 0o755);
        d.set_mtime(mtime);
        d.set_cksum();
        t.raw(&d, b"");
    }
    let tar = t.finish();
    let layers = one_layer(&arena, &tar);
    ok(&mut arena, &layers);
    for (name, want) in [
        ("zero", 0i64),
        ("y2038", 1 << 31),
        ("y2100", 4_102_444_800),
        ("now", 1_700_000_000),
    ] {
        for p in [format!("/{name}"), format!("/{name}.d")] {
            let s = stat(&arena.out, p.as_bytes());
            // ` mtime: 0x12345678:00000003 -- ...`: low 32 bits, then the epoch bits.
            let line = s
                .lines()
                .find(|l| l.trim_start().starts_with("mtime:"))
                .unwrap();
            let hex = line.split_whitespace().nth(1).unwrap();
            let (lo, extra) = hex.trim_start_matches("0x").split_once(':').unwrap();
            let lo = i64::from(u32::from_str_radix(lo, 16).unwrap() as i32);
            let epoch = i64::from(u32::from_str_radix(extra, 16).unwrap() & 3);
            assert_eq!(lo + (epoch << 32), want, "{p}: {line}");
        }
    }
}

#[test]
fn xattrs_are_stored_and_oversized_ones_refused() {
    let mut arena = Arena::new();
    let cap = b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00";
    // user::rw- user:1000:r-- group::r-- mask::r-- other::---
    let acl: Vec<u8> = [
        &2u32.to_le_bytes()[..],
        &[0x01, 0, 6, 0, 0, 0, 0, 0],
        &[0x02, 0, 4, 0, 0xe8, 0x03, 0, 0],
        &[0x04, 0, 4, 0, 0, 0, 0, 0],
        &[0x10, 0, 4, 0, 0, 0, 0, 0],
        &[0x20, 0, 0, 0, 0, 0, 0, 0],
    ]
    .concat();
    let tar = Tarball::default()
        .pax(&[
            ("SCHILY.xattr.security.capability", cap),
            ("SCHILY.xattr.user.note", b"hello"),
            ("SCHILY.xattr.system.posix_acl_access", &acl),
        ])
        .file_as("ping", b"x", 0o755, 0, 0)
        .finish();
    let layers = one_layer(&arena, &tar);
    ok(&mut arena, &layers);
    let out = std::process::Command::new("debugfs")
        .args(["-R", "ea_list /ping"])
        .arg(&arena.out)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&out.stdout);
    assert!(listed.contains("user.note (5) = \"hello\""), "{listed}");
    assert!(listed.contains("security.capability (20)"), "{listed}");
    assert!(listed.contains("system.posix_acl_access"), "{listed}");

    let mut arena = Arena::new();
    let big = vec![b'v'; 5000];
    let tar = Tarball::default()
        .pax(&[("SCHILY.xattr.user.big", &big)])
        .file("f", b"")
        .finish();
    let layers = one_layer(&arena, &tar);
    let msg = refused(&mut arena, &layers);
    assert!(
        msg.contains("entry `f` (header at byte 5632) has an extended attribute `user.big` with a 5000-byte value; ext4 stores at most 4096"),
        "{msg}"
    );
    // Values that fit one by one but not together in ext4's block: refused at the entry, or at
    // the hardlink that would add them to the same inode.
    let half = vec![b'v'; 2020];
    for tar in [
        Tarball::default()
            .pax(&[
                ("SCHILY.xattr.user.a", &half),
                ("SCHILY.xattr.user.b", &half),
            ])
            .file("f", b"")
            .finish(),
        Tarball::default()
            .pax(&[("SCHILY.xattr.user.a", &half)])
            .file("f", b"")
            .pax(&[("SCHILY.xattr.user.b", &half)])
            .hardlink("g", "f", 0o644)
            .finish(),
    ] {
        let mut arena = Arena::new();
        let layers = one_layer(&arena, &tar);
        let msg = refused(&mut arena, &layers);
        assert!(
            msg.contains("need 4088 bytes") && msg.contains("4096-byte block, which holds 4060"),
            "{msg}"
        );
    }
}

#[test]
fn lost_and_found_of_the_image_merges_or_is_dropped() {
    let mut arena = Arena::new();
    let tar = Tarball::default()
        .dir("lost+found", 0o755)
        .file("lost+found/x", b"x")
        .finish();
    let layers = one_layer(&arena, &tar);
    ok(&mut arena, &layers);
    assert_eq!(cat(&arena.out, b"/lost+found/x"), b"x");
    assert!(stat(&arena.out, b"/lost+found").contains("Mode:  0755"));
    let mut arena = Arena::new();
    let tar = Tarball::default().file("lost+found", b"x").finish();
    let layers = one_layer(&arena, &tar);
    arena.seal();
    let progress = RecordingProgress::new();
    flatten_to_ext4(
        &layers,
        &arena.out,
        &Limits::default(),
        &arena.staging,
        &progress,
    )
    .unwrap();
    assert_fsck_clean(&arena.out);
    assert!(
        progress.notices().iter().any(|n| n.contains("lost+found")),
        "{:?}",
        progress.notices()
    );
}

#[test]
fn staging_and_output_are_never_followed_or_overwritten() {
    // The staging path is a symlink to a canary directory: refused, nothing written there.
    let mut arena = Arena::new();
    std::os::unix::fs::symlink(arena.canary("canary_dir"), &arena.staging).unwrap();
    let tar = Tarball::default().file("a", b"a").finish();
    let layers = one_layer(&arena, &tar);
    arena.seal();
    let err = flatten(&arena, &layers).unwrap_err();
    assert!(matches!(err, FlattenError::Staging { .. }), "{err}");
    arena.assert_untouched_but_staging();
    std::fs::remove_file(&arena.staging).unwrap();
    // An existing output is not overwritten.
    std::fs::write(&arena.out, "precious").unwrap();
    let err = flatten(&arena, &layers).unwrap_err();
    assert!(chain(&err).contains("cannot create"), "{}", chain(&err));
    assert_eq!(std::fs::read_to_string(&arena.out).unwrap(), "precious");
    assert!(!arena.staging.exists());
}

#[test]
fn progress_names_each_layer_and_the_ext4_phase() {
    let mut arena = Arena::new();
    let layers: Vec<LayerInput> = (0..3)
        .map(|i| {
            let tar = Tarball::default().file(&format!("f{i}"), b"x").finish();
            blob(&arena.blobs, &tar, Compression::Gzip)
        })
        .collect();
    arena.seal();
    let progress = RecordingProgress::new();
    let stats = flatten_to_ext4(
        &layers,
        &arena.out,
        &Limits::default(),
        &arena.staging,
        &progress,
    )
    .unwrap();
    assert_eq!((stats.entries, stats.files, stats.bytes), (3, 3, 3));
    let phases = progress.phases();
    for want in ["layer 1/3", "layer 2/3", "layer 3/3", "write ext4"] {
        assert!(phases.iter().any(|p| p == want), "{phases:?}");
    }
    assert_eq!(phases.last().map(String::as_str), Some("write ext4"));
    arena.assert_untouched();
}

// ---- Reference: the same image unpacked by umoci (as root) must list the same files. ----

fn reference_layers() -> Vec<(Vec<u8>, Compression)> {
    let busybox = std::fs::read("/bin/busybox")
        .expect("the reference test needs /bin/busybox: apt-get install busybox-static");
    let base = Tarball::default()
        .dir("etc", 0o755)
        .dir("usr", 0o755)
        .dir("usr/bin", 0o755)
        .dir("usr/lib", 0o755)
        .dir("usr/sbin", 0o755)
        .dir("var", 0o755)
        .dir("var/lib", 0o755)
        .dir("var/lib/old", 0o755)
        .dir("var/cache", 0o755)
        .dir("var/cache/apt", 0o755)
        .dir("tmp", 0o1777)
        .dir("root", 0o700)
        .dir("dev", 0o755)
        .dir("home", 0o755)
        .dir_as("home/user", 0o750, 1000, 1000)
        .file_as("usr/bin/busybox", &busybox, 0o755, 0, 0)
        .symlink("bin", "usr/bin")
        .symlink("sbin", "usr/sbin")
        .symlink("lib", "/usr/lib")
        .hardlink("usr/bin/sh", "usr/bin/busybox", 0o755)
        .symlink("usr/bin/ls", "busybox")
        .file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
        .file("etc/group", b"root:x:0:\n")
        .file_as("etc/shadow", b"root:*:19000:0:99999:7:::\n", 0o640, 0, 42)
        .device("dev/null", b'3', 1, 3, 0o666)
        .device("dev/zero", b'3', 1, 5, 0o666)
        .device("dev/loop0", b'4', 7, 0, 0o660)
        .link_as("dev/initctl", b'6', "", 0o600)
        .file("var/lib/old/a", b"a\n")
        .file("var/lib/old/b", b"b\n")
        .file("var/cache/apt/pkgcache.bin", &[7u8; 10000])
        .file("var/cache/x", b"x")
        .file_as("home/user/.profile", b"PATH=/bin\n", 0o644, 1000, 1000)
        .file_as("usr/bin/passwd", b"passwd", 0o4755, 0, 0)
        .file_as("usr/bin/wall", b"wall", 0o2755, 0, 5)
        .file("etc/to_dir", b"file first\n")
        .dir("etc/to_file", 0o755)
        .file("etc/to_file/child", b"child\n")
        .finish();
    let upper = Tarball::default()
        .file_as("bin/newtool", b"#!/bin/sh\necho new\n", 0o755, 0, 0)
        .file("lib/libfoo.so.1", b"\x7fELF")
        .symlink("lib/libfoo.so", "libfoo.so.1")
        .file("var/lib/old/.wh.a", b"")
        .file("var/cache/.wh..wh..opq", b"")
        .file("var/cache/new", b"new\n")
        .hardlink("usr/bin/ash", "/usr/bin/busybox", 0o755)
        .dir("etc/to_dir", 0o755)
        .file("etc/to_dir/x", b"x\n")
        .file("etc/to_file", b"now a file\n")
        .dir("usr/share", 0o755)
        .dir_as("usr/share/doc", 0o2775, 0, 50)
        .file("home/user/.wh..profile", b"")
        .finish();
    let top = Tarball::default()
        .file(".wh.home", b"")
        .dir("home", 0o755)
        .dir_as("home/other", 0o700, 2000, 2000)
        .file(
            "etc/passwd",
            b"root:x:0:0:root:/root:/bin/sh\nother:x:2000:2000::/home/other:/bin/sh\n",
        )
        .file_as("usr/bin/mode0", b"", 0, 0, 0)
        .file("dev/.wh.loop0", b"")
        .finish();
    vec![
        (base, Compression::Gzip),
        (upper, Compression::Gzip),
        (top, Compression::None),
    ]
}

#[test]
fn the_file_list_equals_umocis_unpack_of_the_same_image() {
    require_tools(&[("umoci", "umoci")]);
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the umoci reference test must run as root (umoci unpack creates device nodes and owners); run `sudo make test`"
    );
    let dir = tempfile::tempdir().unwrap();
    let layout = dir.path().join("layout");
    let inputs = oci_layout(&layout, "test", &reference_layers());
    let bundle = dir.path().join("bundle");
    let out = std::process::Command::new("umoci")
        .arg("unpack")
        .arg("--image")
        .arg(format!("{}:test", layout.display()))
        .arg(&bundle)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "umoci unpack: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let theirs = read_tree(&bundle.join("rootfs"));

    let mut arena = Arena::new();
    let ours = ok(&mut arena, &inputs);

    let shape = |m: &BTreeMap<Vec<u8>, Node>| -> Vec<String> {
        m.iter()
            .map(|(p, n)| {
                let mode = if n.kind == 'l' { 0o777 } else { n.mode };
                format!(
                    "{} {} {:04o} {}:{} size={} target={:?} dev={:?}",
                    String::from_utf8_lossy(p),
                    n.kind,
                    mode,
                    n.uid,
                    n.gid,
                    n.size,
                    n.target
                        .as_ref()
                        .map(|t| String::from_utf8_lossy(t).into_owned()),
                    n.rdev
                )
            })
            .collect()
    };
    let (ours_list, theirs_list) = (shape(&ours), shape(&theirs));
    if ours_list != theirs_list {
        let only_ours: Vec<&String> = ours_list
            .iter()
            .filter(|l| !theirs_list.contains(l))
            .collect();
        let only_theirs: Vec<&String> = theirs_list
            .iter()
            .filter(|l| !ours_list.contains(l))
            .collect();
        panic!(
            "file lists differ\nonly in ours: {only_ours:#?}\nonly in umoci's: {only_theirs:#?}"
        );
    }
    assert_eq!(link_groups(&ours), link_groups(&theirs));
    // The interesting rules, spelled out.
    assert!(ours.contains_key(&path("/usr/bin/newtool")));
    assert!(ours.contains_key(&path("/usr/lib/libfoo.so.1")));
    assert!(!ours.contains_key(&path("/var/lib/old/a")));
    assert!(!ours.contains_key(&path("/var/cache/apt")));
    assert!(!ours.contains_key(&path("/home/user")));
    assert_eq!(link_groups(&ours).len(), 1);
    assert_eq!(ours_list.len(), 40, "{ours_list:#?}");
}

// ---- Size: a tree of about 30,000 files. ----

/// Reports phases with their start times (to print where the time goes).
#[derive(Default)]
struct Timing(std::sync::Mutex<Vec<(String, Instant)>>);

impl banger_image::Progress for Timing {
    fn phase(&self, name: &str) {
        self.0
            .lock()
            .unwrap()
            .push((name.to_string(), Instant::now()));
    }
    fn bytes(&self, _done: u64, _total: Option<u64>) {}
    fn log(&self, _line: &str) {}
    fn notice(&self, _msg: &str) {}
}

/// Three layers shaped like a distribution image: 1,000 directories of 30 files (a few
/// symlinks and hardlinks among them), one directory of 3,000 entries, and an upper layer that
/// replaces and whites out some of them. Content is pseudo-random text, so it compresses ~3x.
fn thirty_thousand_files() -> Vec<(Vec<u8>, Compression)> {
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut content = |len: usize| -> Vec<u8> {
        (0..len)
            .map(|_| b"abcdefghijklmnop \n"[(next() % 18) as usize])
            .collect()
    };
    let mut base = Tarball::default();
    let mut files = 0;
    for top in 0..50 {
        base.dir(&format!("usr/share/t{top}"), 0o755);
        for sub in 0..20 {
            let d = format!("usr/share/t{top}/s{sub}");
            base.dir(&d, 0o755);
            for f in 0..30 {
                let name = format!("{d}/file-{f}.txt");
                match f {
                    28 => base.symlink(&name, "file-0.txt"),
                    29 => base.hardlink(&name, &format!("{d}/file-1.txt"), 0o644),
                    _ => {
                        let len = if f % 10 == 0 {
                            16 << 10
                        } else {
                            (f * 211) % 4000
                        };
                        base.file(&name, &content(len))
                    }
                };
                files += 1;
            }
        }
    }
    base.dir("usr/lib/x86_64-linux-gnu", 0o755);
    for i in 0..3000 {
        base.file_as(
            &format!("usr/lib/x86_64-linux-gnu/lib{i}.so.1"),
            &content(1500),
            0o755,
            0,
            0,
        );
        files += 1;
    }
    assert_eq!(files, 33_000);
    let mut upper = Tarball::default();
    for top in 0..50 {
        upper.file(&format!("usr/share/t{top}/s0/file-1.txt"), &content(100));
        upper.file(&format!("usr/share/t{top}/s1/.wh.file-2.txt"), b"");
    }
    upper.file("usr/share/t0/.wh..wh..opq", b"");
    vec![
        (base.finish(), Compression::Gzip),
        (upper.finish(), Compression::Gzip),
    ]
}

#[test]
fn a_thirty_thousand_file_image_flattens_and_checks_clean() {
    let dir = tempfile::tempdir().unwrap();
    let layout = std::env::var_os("BANGER_FLATTEN_BENCH_LAYOUT")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| dir.path().join("layout"));
    let layers = oci_layout(&layout, "bench", &thirty_thousand_files());
    let mut arena = Arena::new();
    arena.seal();
    require_e2fsprogs();
    let timing = Timing::default();
    let start = Instant::now();
    let stats = flatten_to_ext4(
        &layers,
        &arena.out,
        &Limits::default(),
        &arena.staging,
        &timing,
    )
    .unwrap();
    let total = start.elapsed();
    let phases = timing.0.lock().unwrap().clone();
    let ext4_start = phases.iter().find(|(n, _)| n == "write ext4").unwrap().1;
    eprintln!(
        "flattened {} entries ({} files, {} MB) into a {} MB ext4 in {:.2} s (layers {:.2} s, ext4 {:.2} s)",
        stats.entries,
        stats.files,
        stats.bytes >> 20,
        stats.ext4_bytes >> 20,
        total.as_secs_f64(),
        (ext4_start - start).as_secs_f64(),
        (total - (ext4_start - start)).as_secs_f64(),
    );
    // Base: 50 + 1,000 directories, 30,000 entries, the big directory and its 3,000 files;
    // upper: 50 files, 50 whiteouts, one opaque marker.
    assert_eq!(stats.entries, 34_051 + 101);
    assert_fsck_clean(&arena.out);
    arena.assert_untouched();
    // Spot checks: the whiteouts, the opaque directory, a hardlink, the big directory.
    let ls_big = ls(&arena.out, b"/usr/lib/x86_64-linux-gnu");
    assert_eq!(ls_big.len(), 3000);
    assert!(ls_big.iter().all(|e| e.2 & 0o7777 == 0o755));
    let s1 = ls(&arena.out, b"/usr/share/t7/s1");
    assert!(!s1.iter().any(|e| e.0 == b"file-2.txt"));
    // The opaque t0 keeps only what the upper layer itself wrote under it.
    let t0: Vec<Vec<u8>> = ls(&arena.out, b"/usr/share/t0")
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(t0, [b"s0".to_vec()]);
    assert_eq!(ls(&arena.out, b"/usr/share/t0/s0").len(), 1);
    let s5 = ls(&arena.out, b"/usr/share/t9/s5");
    let ino = |n: &[u8]| s5.iter().find(|e| e.0 == n).unwrap().1;
    assert_eq!(ino(b"file-1.txt"), ino(b"file-29.txt"));
}

#[test]
fn an_image_without_layers_is_an_empty_root() {
    let mut arena = Arena::new();
    let img = ok(&mut arena, &[]);
    assert!(img.is_empty(), "{img:?}");
}

// ---- Memory: the flattening process's peak RSS, measured alone in a child process. ----

/// Set in the child process: which layers to flatten (one `PATH DIGEST DIFF_ID` line each).
const RSS_CHILD_LAYERS: &str = "BANGER_FLATTEN_RSS_LAYERS";
const RSS_TEST: &str = "peak_memory_stays_under_256_mib_for_a_large_image_and_hostile_xattrs";

/// This process's peak resident memory (VmHWM), in KiB.
fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

/// The child's side: flatten the layers it was given, print the peak RSS and the outcome.
fn rss_child(spec: &str) {
    let layers: Vec<LayerInput> = spec
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(' ').collect();
            LayerInput {
                path: f[0].into(),
                compression: Compression::Gzip,
                digest: f[1].parse().unwrap(),
                diff_id: f[2].parse().unwrap(),
            }
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let start = Instant::now();
    let result = flatten_to_ext4(
        &layers,
        &dir.path().join("root.ext4"),
        &Limits::default(),
        &dir.path().join("staging"),
        &banger_image::NoProgress,
    );
    let outcome = match result {
        Ok(s) => format!("ok entries={}", s.entries),
        Err(e) => format!("err={}", chain(&e).replace('\n', " ")),
    };
    println!(
        "RSS-RESULT hwm_kib={} secs={:.1} {outcome}",
        peak_rss_kib(),
        start.elapsed().as_secs_f64()
    );
}

/// Flattens `layers` in a child process running only this test (peak RSS is per process, and
/// the other tests of this binary share this one): (peak RSS in MiB, Ok or the error chain).
fn flatten_alone(layers: &[LayerInput]) -> (u64, Result<(), String>) {
    let spec: Vec<String> = layers
        .iter()
        .map(|l| format!("{} {} {}", l.path.display(), l.digest, l.diff_id))
        .collect();
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", RSS_TEST, "--nocapture", "--test-threads=1"])
        .env(RSS_CHILD_LAYERS, spec.join("\n"))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        // libtest prints the test's name on the same line first.
        .find_map(|l| l.split_once("RSS-RESULT ").map(|(_, r)| r))
        .unwrap_or_else(|| {
            panic!(
                "the child printed no result: {stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    eprintln!("child: {line}");
    let (hwm, rest) = line.split_once(' ').unwrap();
    let hwm: u64 = hwm.strip_prefix("hwm_kib=").unwrap().parse().unwrap();
    let (_, outcome) = rest.split_once(' ').unwrap();
    let result = match outcome.strip_prefix("err=") {
        Some(e) => Err(e.to_string()),
        None => Ok(()),
    };
    (hwm >> 10, result)
}

#[test]
fn peak_memory_stays_under_256_mib_for_a_large_image_and_hostile_xattrs() {
    if let Ok(spec) = std::env::var(RSS_CHILD_LAYERS) {
        return rss_child(&spec);
    }
    require_e2fsprogs();
    let dir = tempfile::tempdir().unwrap();

    // The reviewer's scenario, scaled down: 400 entries, each with a 1 MiB PAX header of sixteen
    // 60 KiB values (about 400 MiB held if they were kept).
    let mut w = LayerWriter::create(&dir.path().join("big-values"));
    let value = vec![b'v'; 60 << 10];
    let names: Vec<String> = (0..16).map(|i| format!("SCHILY.xattr.user.{i}")).collect();
    let records: Vec<(&str, &[u8])> = names.iter().map(|n| (n.as_str(), &value[..])).collect();
    for i in 0..400 {
        w.pax(&records).file(&format!("f{i}"), b"");
    }
    let (mib, result) = flatten_alone(&[w.finish()]);
    let err = result.expect_err("60 KiB xattr values were accepted");
    assert!(err.contains("entry `f0`") && err.contains("4096"), "{err}");
    assert!(mib < 256, "peak RSS {mib} MiB with 60 KiB xattr values");

    // Values ext4 can store, on 70,000 entries: about 270 MiB of metadata, above the budget.
    let mut w = LayerWriter::create(&dir.path().join("many-values"));
    let mut value = vec![b'v'; 3900];
    for i in 0..70_000u32 {
        value[..4].copy_from_slice(&i.to_le_bytes());
        w.pax(&[("SCHILY.xattr.user.x", &value)])
            .file(&format!("d{}/f{i}", i % 100), b"");
    }
    let (mib, result) = flatten_alone(&[w.finish()]);
    let err = result.expect_err("270 MiB of xattrs were accepted");
    assert!(err.contains("metadata"), "{err}");
    assert!(mib < 256, "peak RSS {mib} MiB with 270 MiB of xattrs");

    // A large ordinary image: 100,000 entries in two layers.
    let mut w = LayerWriter::create(&dir.path().join("large-base"));
    for d in 0..1000 {
        w.dir(&format!("usr/share/d{d}"));
        for f in 0..95 {
            let name = format!("usr/share/d{d}/file-{f}.txt");
            if f == 94 {
                w.symlink(&name, "file-0.txt");
            } else {
                w.file(&name, format!("{d}/{f}\n").as_bytes());
            }
        }
    }
    let base = w.finish();
    let mut w = LayerWriter::create(&dir.path().join("large-upper"));
    for d in 0..1000 {
        for f in 0..4 {
            w.file(&format!("usr/share/d{d}/new-{f}"), b"new\n");
        }
    }
    let (mib, result) = flatten_alone(&[base, w.finish()]);
    result.unwrap();
    assert!(mib < 256, "peak RSS {mib} MiB for 100,000 entries");
}
