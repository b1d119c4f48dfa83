//! banger's host networking: the bridge guests sit on, one tap per VM, IPv4 forwarding and NAT for guest
//! egress (one nft table, `inet banger`, owned by banger), and guest IP/MAC allocation.
//!
//! Layout:
//! - `addr`: `Subnet`, `Lease`, `Mac` and lowest-free allocation (pure).
//! - `egress`: egress policies (open, deny, allow-lists of names, sealed) and name matching (pure).
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
pub mod egress;
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
pub use egress::{Egress, HostPattern, NameVerdict, Outbound, PatternError};
pub use fake::FakeHostNet;
pub use host::{Changes, HostNet, NetError};
pub use names::{BridgeName, BridgeOwner, NameError, Ownership, TapName, BRIDGE_MARK, TAP_PREFIX};
pub use nat::{GuestLinks, HostAccess, NatRuleset, PortGuard};
pub use privileged::{Elevation, PrivilegedError, PrivilegedRunner};
pub use service::{AttachedTap, BridgeConfig, BridgeConfigError, Network, ReconcileReport};
pub use system::SystemHostNet;
pub use tun::TunError;

use banger_hint::probe;

/// The crate's error types that carry hints, for a [`banger_hint::Report`] of an error chain.
/// Every type here that implements [`banger_hint::Hint`] must be listed: Rust cannot enumerate a
/// trait's implementations, so nothing fails if one is forgotten except its hint going missing
/// (`tests::every_hinted_type_is_probed` keeps this list and its samples in step).
pub const HINTS: &[banger_hint::Probe] = &[
    probe::<SubnetError>,
    probe::<AllocError>,
    probe::<NetError>,
    probe::<NameError>,
    probe::<PrivilegedError>,
    probe::<BridgeConfigError>,
    probe::<PatternError>,
];

#[cfg(test)]
mod tests {
    use super::*;
    use banger_hint::Report;
    use std::error::Error;

    /// One hinted value of each type, in the order of [`HINTS`].
    fn samples() -> Vec<Box<dyn Error>> {
        let subnet: Subnet = "10.0.0.1/30".parse().unwrap();
        vec![
            Box::new("10.0.0.1".parse::<Subnet>().unwrap_err()),
            Box::new(subnet.allocate(["10.0.0.2".parse().unwrap()]).unwrap_err()),
            Box::new(NetError::NotABridge {
                name: "eth0".into(),
                kind: "device".into(),
            }),
            Box::new(BridgeName::parse("a/b").unwrap_err()),
            Box::new(PrivilegedError::Write {
                op: "enable forwarding",
                path: "/proc/sys/net/ipv4/ip_forward".into(),
                source: std::io::ErrorKind::PermissionDenied.into(),
            }),
            Box::new(BridgeConfig::parse("banger0", "10.0.0.0/24").unwrap_err()),
            Box::new(HostPattern::parse("a b").unwrap_err()),
        ]
    }

    #[test]
    fn every_hinted_type_is_probed() {
        let samples = samples();
        assert_eq!(samples.len(), HINTS.len(), "one sample per probe");
        for (i, (probe, sample)) in HINTS.iter().zip(&samples).enumerate() {
            assert!(
                probe(sample.as_ref()).is_some(),
                "probe {i} finds no hint on `{sample}`"
            );
            assert!(!sample.to_string().contains("hint:"), "{sample}");
        }
    }

    #[test]
    fn a_privileged_failure_behind_a_net_error_keeps_its_hint() {
        let e = NetError::Privileged(PrivilegedError::Failed {
            op: "create bridge",
            command: "sudo -n -- ip link add".into(),
            status: "exit status: 1".into(),
            stderr: "sudo: a password is required".into(),
            hint: "allow passwordless sudo".into(),
        });
        let r = Report::new(&e, &[HINTS]);
        assert_eq!(r.hints, ["allow passwordless sudo"]);
        assert!(r.message().ends_with("sudo: a password is required"), "{r}");
    }
}
