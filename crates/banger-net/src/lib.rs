//! banger's host networking: the bridge guests sit on, one tap per VM, IPv4 forwarding and NAT for guest
//! egress (one nft table, `inet banger`, owned by banger), and guest IP/MAC allocation.
//!
//! Layout:
//! - `addr`: `Subnet`, `Lease`, `Mac` and lowest-free allocation (pure).
//! - `names`: `BridgeName`, `TapName` (`bg-<short>`), checked against IFNAMSIZ (pure).
//! - `nat`: the generated nft ruleset (pure).
//! - `host`: the `HostNet` trait, the seam between logic and host effects.
//! - `system`: the real `HostNet` (iproute2 `ip -j`, `nft -f -`, tap ioctls).
//! - `privileged`: the one narrow path for privileged steps (direct when root, else `sudo -n`), logged.
//! - `resolved`: routing `.vm` lookups to banger's DNS server through systemd-resolved.
//! - `fake`: a recording `HostNet` for tests here and in the daemon.
//! - `service`: `Network`, which orders the steps and reconciles taps.
//!
//! Not here: lease persistence and the VM records (the daemon's store), the DNS server itself, and anything inside the
//! guest. All calls are blocking and act on the calling process's network namespace; the daemon runs them
//! on `spawn_blocking`.

// Unit tests may unwrap; the workspace lint is for production code (no clippy.toml
// `allow-unwrap-in-tests` in the workspace yet).
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

pub mod addr;
pub mod fake;
pub mod host;
pub mod names;
pub mod nat;
pub mod privileged;
pub mod resolved;
pub mod service;
pub mod system;
mod tun;

pub use addr::{AllocError, Lease, Mac, MacError, Subnet, SubnetError};
pub use fake::FakeHostNet;
pub use host::{Changes, HostNet, NetError};
pub use names::{BridgeName, NameError, TapName, TAP_PREFIX};
pub use nat::{HostAccess, NatRuleset};
pub use privileged::{Elevation, PrivilegedError, PrivilegedRunner};
pub use service::{AttachedTap, BridgeConfig, BridgeConfigError, Network, ReconcileReport};
pub use system::SystemHostNet;
pub use tun::TunError;
