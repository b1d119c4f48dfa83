//! Arbitrary bytes as one uncompressed layer tar, through the tar boundary and the merged tree
//! (no ext4): parsing returns entries or an error and never panics, every accepted path is
//! normalised, every accepted entry's xattrs fit ext4's one attribute block, and merging the
//! entries (first half as a lower layer, the rest as an upper one) either succeeds or refuses
//! an entry, never panics.
#![no_main]

use banger_image::oci::flatten::Limits;
use banger_image::oci::tar::{read_entries, xattr_space, Discard, XATTR_BLOCK_SPACE};
use banger_image::oci::tree::Tree;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_entries: 10_000,
        ..Limits::default()
    };
    let Ok((entries, _notices)) = read_entries(data, &limits, &mut Discard) else {
        return;
    };
    for e in &entries {
        let mut len = 0;
        for n in e.path.components() {
            let b = n.as_bytes();
            assert!(!b.is_empty() && b != b"." && b != b"..");
            assert!(!b.iter().any(|c| matches!(c, b'/' | 0 | b'\n' | b'\r')));
            len += b.len() + 1;
        }
        assert!(len <= limits.max_path);
        assert!(e.xattrs.iter().all(|x| x.value.len() <= limits.max_xattr_value));
        assert!(xattr_space(&e.xattrs) <= XATTR_BLOCK_SPACE);
    }
    let mut tree = Tree::new(&limits);
    let half = entries.len() / 2;
    for (i, e) in entries.into_iter().enumerate() {
        if tree.apply(u32::from(i >= half), e).is_err() {
            return;
        }
    }
    let _ = tree.stats();
    let _ = tree.listing();
});
