//! Container images from OCI registries: references, credentials, the registry client, manifest
//! resolution, the image config subset banger uses, and the content-addressed blob cache.
//!
//! Pipeline: [`manifest::resolve`] (reference -> platform manifest -> verified config) ->
//! [`cache::fetch_layers`] (verified layer blobs in the cache) -> flattening into an ext4.

pub mod auth;
pub mod cache;
pub mod client;
pub mod config;
pub mod manifest;
pub mod reference;
