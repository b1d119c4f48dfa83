//! banger's `.vm` DNS server: `<vm>.vm` answers the VM's address, unknown names in the zone get
//! NXDOMAIN, and every other name is forwarded to the host's resolvers so guests (whose only
//! resolver is the bridge address) reach the world. The daemon runs it on the bridge address while
//! the bridge exists; hickory-server does the protocol work, this crate only the decisions.
//!
//! - `zone`: the name table and the pure answer rules.
//! - `upstream`: finding the host's resolvers in resolv.conf.
//! - `forward`: relaying queries upstream.
//! - `gate`: what egress policies decide for names outside `.vm` (the daemon implements it).
//! - `server`: the request handler and the listeners.

#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod forward;
pub mod gate;
pub mod server;
pub mod upstream;
pub mod zone;

pub use forward::Forwarder;
pub use gate::{Decision, EgressGate};
pub use server::{client_net, serve, serve_handler, DnsError, Handler, RunningDns};
pub use zone::{Answer, QueryKind, Zone};
