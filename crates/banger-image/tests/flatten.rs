//! Flattening layers into ext4 with real parts: real gzip/zstd blobs, real mkfs.ext4 and
//! debugfs, read back with debugfs and checked with `e2fsck -fn`; the hostile-layer corpus with
//! canaries around the staging directory; GNU tar as the reference for what an archive holds.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use banger_image::oci::flatten::{flatten_to_ext4, FlattenError, FlattenStats, LayerInput, Limits};
use banger_image::oci::layer::Compression;
use banger_image::{RecordingProgress, Sha256Digest};
use std::collections::BTreeMap;
use std::path::Path;
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

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
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
}
