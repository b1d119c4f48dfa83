//! The `HostNet` trait: every effect banger has on the host's network, as a handful of idempotent steps.
//!
//! `SystemHostNet` (system.rs) is the real implementation; `FakeHostNet` (fake.rs) records calls and keeps
//! an in-memory model so the logic in `Network` (service.rs) is tested without root. The trait is
//! synchronous: each step is a few short commands, and the async daemon calls it from
//! `tokio::task::spawn_blocking`.

use std::borrow::Cow;
use std::fmt;
use std::net::Ipv4Addr;
use std::time::Duration;

use banger_hint::Hint;
use nix::unistd::Uid;

use crate::addr::Subnet;
use crate::names::{BridgeName, TapName};
use crate::nat::{NatRuleset, PortGuard};
use crate::privileged::PrivilegedError;

/// What a step changed on the host, in words for logs and progress; empty means "already as wanted".
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct Changes(Vec<String>);

impl Changes {
    pub fn none() -> Self {
        Changes(Vec::new())
    }

    pub fn push(&mut self, change: impl Into<String>) {
        self.0.push(change.into());
    }

    pub fn extend(&mut self, other: Changes) {
        self.0.extend(other.0);
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl fmt::Display for Changes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            f.write_str("no changes")
        } else {
            f.write_str(&self.0.join("; "))
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Privileged(#[from] PrivilegedError),
    #[error("could not read {what} from `{command}`")]
    Parse {
        what: &'static str,
        command: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("interface {name} exists but is a {kind}, not a bridge")]
    NotABridge { name: String, kind: String },
    #[error("interface {name} exists but is a {kind}, not a tap; banger will not touch it")]
    NotATap { name: String, kind: String },
    #[error("bridge {name} exists but banger did not create it; banger will not use or change it")]
    NotOurs { name: String },
    #[error("bridge {name} belongs to another banger daemon ({owner}); this one will not use or change it")]
    OtherDaemon { name: String, owner: String },
    #[error("the guests' subnet {subnet} overlaps the host's route {route}")]
    SubnetOverlap { subnet: Subnet, route: String },
    #[error("could not read IPv4 forwarding state")]
    Forwarding(#[source] std::io::Error),
}

impl Hint for NetError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            // Transparent: the privileged error is not in the chain, so its hint is asked here.
            NetError::Privileged(e) => e.hint(),
            NetError::Parse { .. } => {
                Some("banger expects iproute2 / nftables with JSON output (-j)".into())
            }
            NetError::NotABridge { name, .. } => Some(
                format!("remove it (`ip link del {name}`) or set `bridge_name` to a free name")
                    .into(),
            ),
            NetError::NotOurs { name } => Some(
                format!("set `bridge_name` to a name no interface has (banger creates it), or remove {name} if it is a leftover")
                    .into(),
            ),
            NetError::OtherDaemon { .. } => Some(
                "give this daemon a bridge of its own: set `bridge_name` and `bridge_subnet` in config.toml (e.g. \"banger1\" and \"172.16.1.1/24\"), then `banger daemon restart`"
                    .into(),
            ),
            NetError::SubnetOverlap { .. } => Some(
                "set `bridge_subnet` to a range the host does not use, e.g. \"10.213.0.1/24\" (`ip -4 route` lists the host's)"
                    .into(),
            ),
            NetError::NotATap { name, .. } => {
                Some(format!("remove it by hand (`ip link del {name}`) if nothing needs it").into())
            }
            NetError::Forwarding(_) => None,
        }
    }
}

/// The host's network, as banger needs it. Every method is idempotent.
pub trait HostNet: Send + Sync {
    /// Creates the bridge if missing, gives it the gateway address, and brings it up.
    fn ensure_bridge(&self, bridge: &BridgeName, subnet: &Subnet) -> Result<Changes, NetError>;

    /// Turns on IPv4 forwarding in the current network namespace.
    fn enable_ip_forwarding(&self) -> Result<Changes, NetError>;

    /// Makes banger's nft table exactly `ruleset`, replacing it atomically if it differs.
    fn ensure_nat(&self, ruleset: &NatRuleset) -> Result<Changes, NetError>;

    /// Creates the tap (owned by `owner`) if missing, attaches it to `bridge` and brings it up.
    fn create_tap(
        &self,
        tap: &TapName,
        owner: Uid,
        bridge: &BridgeName,
    ) -> Result<Changes, NetError>;

    /// Deletes the tap; a tap that does not exist is not an error.
    fn delete_tap(&self, tap: &TapName) -> Result<Changes, NetError>;

    /// Lets `tap` send from `guard`'s MAC and IPv4 address, and from nothing else.
    fn guard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError>;

    /// Takes `tap`'s addresses back; nothing to take back is not an error.
    fn unguard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError>;

    /// Lets `guest` (under an egress allow-list) reach `destinations` for about `ttl` (see
    /// `nat::egress_timeout`), renewing pairs that are there already.
    fn allow_outbound(
        &self,
        guest: Ipv4Addr,
        destinations: &[Ipv4Addr],
        ttl: Duration,
    ) -> Result<(), NetError>;

    /// Takes back every destination `guest` was allowed to reach; none is not an error.
    fn forget_outbound(&self, guest: Ipv4Addr) -> Result<Changes, NetError>;

    /// Every tap on the host whose name carries banger's prefix, sorted.
    fn list_taps(&self) -> Result<Vec<TapName>, NetError>;

    /// Deletes banger's nft table and the bridge. Forwarding is left on: other software may rely on it.
    fn teardown(&self, bridge: &BridgeName) -> Result<Changes, NetError>;
}

impl<H: HostNet + ?Sized> HostNet for &H {
    fn ensure_bridge(&self, bridge: &BridgeName, subnet: &Subnet) -> Result<Changes, NetError> {
        (**self).ensure_bridge(bridge, subnet)
    }
    fn enable_ip_forwarding(&self) -> Result<Changes, NetError> {
        (**self).enable_ip_forwarding()
    }
    fn ensure_nat(&self, ruleset: &NatRuleset) -> Result<Changes, NetError> {
        (**self).ensure_nat(ruleset)
    }
    fn create_tap(
        &self,
        tap: &TapName,
        owner: Uid,
        bridge: &BridgeName,
    ) -> Result<Changes, NetError> {
        (**self).create_tap(tap, owner, bridge)
    }
    fn delete_tap(&self, tap: &TapName) -> Result<Changes, NetError> {
        (**self).delete_tap(tap)
    }
    fn guard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError> {
        (**self).guard_port(tap, guard)
    }
    fn unguard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError> {
        (**self).unguard_port(tap, guard)
    }
    fn allow_outbound(
        &self,
        guest: Ipv4Addr,
        destinations: &[Ipv4Addr],
        ttl: Duration,
    ) -> Result<(), NetError> {
        (**self).allow_outbound(guest, destinations, ttl)
    }
    fn forget_outbound(&self, guest: Ipv4Addr) -> Result<Changes, NetError> {
        (**self).forget_outbound(guest)
    }
    fn list_taps(&self) -> Result<Vec<TapName>, NetError> {
        (**self).list_taps()
    }
    fn teardown(&self, bridge: &BridgeName) -> Result<Changes, NetError> {
        (**self).teardown(bridge)
    }
}
