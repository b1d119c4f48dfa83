//! OCI images: from verified layer blobs to a bootable root file system.
//!
//! Flattening pipeline: `layer` (decompress, verify digests, bound sizes) -> `tar` (the
//! untrusted boundary: entries) -> `tree` (merge layers in memory) -> `ext4` (debugfs, no root),
//! driven by `flatten`.
pub mod ext4;
pub mod flatten;
pub mod layer;
pub mod tar;
pub mod tree;
