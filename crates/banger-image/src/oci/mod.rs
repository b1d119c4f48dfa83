//! Container images from OCI registries, from a reference to a bootable root file system.
//!
//! Pulling: [`manifest::resolve`] (reference -> platform manifest -> verified config, with
//! credentials from [`auth`] and requests through [`client`]) -> [`cache::fetch_layers`]
//! (verified layer blobs in the content-addressed cache).
//!
//! Flattening: `layer` (decompress, verify both digests, bound sizes) -> `tar` (the untrusted
//! boundary: entries) -> `tree` (merge layers in memory) -> `ext4` (debugfs, no root), driven by
//! [`flatten::flatten_to_ext4`] ([`pull::build_rootfs`] runs it off the async runtime). [`config`] is the part of the image config banger keeps.

pub mod auth;
pub mod cache;
pub mod client;
pub mod config;
pub mod ext4;
pub mod flatten;
pub mod layer;
pub mod manifest;
pub mod pull;
pub mod reference;
pub mod tar;
pub mod tree;
