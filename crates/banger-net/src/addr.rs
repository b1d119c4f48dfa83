//! Guest addressing: the bridge subnet (`Subnet`), the per-VM address (`Lease`) and its MAC (`Mac`).
//!
//! Everything here is pure: allocation takes the set of addresses already leased (the daemon's store owns
//! that set) and returns the lowest free host address. Nothing here touches the host; the bridge itself is
//! `HostNet`'s job.

use banger_hint::Hint;
use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;
use std::net::Ipv4Addr;
use std::str::FromStr;

/// Config key that sets the subnet; named in every error so the user knows what to change.
pub const SUBNET_CONFIG_KEY: &str = "bridge_subnet";

/// The bridge's IPv4 subnet, written the way the config writes it: the gateway (the bridge's own address)
/// and the prefix length, e.g. `172.16.0.1/24`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Subnet {
    gateway: Ipv4Addr,
    prefix_len: u8,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SubnetError {
    #[error("`{SUBNET_CONFIG_KEY}` = {input:?} is not an IPv4 address with a prefix length")]
    Syntax { input: String },
    #[error(
        "`{SUBNET_CONFIG_KEY}` = {input:?} has prefix length /{prefix_len}, which leaves no room for guests"
    )]
    PrefixLength { input: String, prefix_len: u8 },
    #[error(
        "`{SUBNET_CONFIG_KEY}` = {input:?}: {gateway} is the {what} address of its subnet, not a usable \
         bridge address"
    )]
    GatewayNotHost {
        input: String,
        gateway: Ipv4Addr,
        what: &'static str,
        suggestion: Ipv4Addr,
        prefix_len: u8,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocError {
    #[error("no free guest address in bridge subnet {subnet} ({capacity} usable, all leased)")]
    NoFreeAddress { subnet: Subnet, capacity: u64 },
    #[error("address {ip} is not a guest address of bridge subnet {subnet} ({reason})")]
    NotAGuestAddress {
        ip: Ipv4Addr,
        subnet: Subnet,
        reason: &'static str,
    },
}

impl Hint for SubnetError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            SubnetError::Syntax { .. } => {
                "write it as the bridge's own address and prefix, e.g. \"172.16.0.1/24\"".into()
            }
            SubnetError::PrefixLength { .. } => {
                "use a prefix length between /1 and /30, e.g. \"172.16.0.1/24\"".into()
            }
            SubnetError::GatewayNotHost {
                suggestion,
                prefix_len,
                ..
            } => format!("use the first host address instead, e.g. \"{suggestion}/{prefix_len}\"")
                .into(),
        })
    }
}

impl Hint for AllocError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        Some(match self {
            AllocError::NoFreeAddress { subnet, .. } => format!(
                "delete VMs you no longer need, or set a larger `{SUBNET_CONFIG_KEY}` in the \
                 banger config (e.g. \"{}/{}\")",
                subnet.gateway(),
                subnet.prefix_len().saturating_sub(4).max(1)
            )
            .into(),
            AllocError::NotAGuestAddress { .. } => {
                format!("the VM record predates a change of `{SUBNET_CONFIG_KEY}`; recreate the VM")
                    .into()
            }
        })
    }
}

impl Subnet {
    /// banger's default: `172.16.0.1/24`.
    pub const DEFAULT: Subnet = Subnet {
        gateway: Ipv4Addr::new(172, 16, 0, 1),
        prefix_len: 24,
    };

    pub fn new(gateway: Ipv4Addr, prefix_len: u8) -> Result<Self, SubnetError> {
        let input = format!("{gateway}/{prefix_len}");
        if !(1..=30).contains(&prefix_len) {
            return Err(SubnetError::PrefixLength { input, prefix_len });
        }
        let subnet = Subnet {
            gateway,
            prefix_len,
        };
        let what = if gateway == subnet.network() {
            Some("network")
        } else if gateway == subnet.broadcast() {
            Some("broadcast")
        } else {
            None
        };
        if let Some(what) = what {
            return Err(SubnetError::GatewayNotHost {
                input,
                gateway,
                what,
                suggestion: Ipv4Addr::from(u32::from(subnet.network()) + 1),
                prefix_len,
            });
        }
        Ok(subnet)
    }

    /// The bridge's own address, which guests use as their default route.
    pub fn gateway(&self) -> Ipv4Addr {
        self.gateway
    }

    pub fn prefix_len(&self) -> u8 {
        self.prefix_len
    }

    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix_len))
    }

    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) & self.mask())
    }

    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.gateway) | !self.mask())
    }

    /// The subnet in network form (`172.16.0.0/24`), as nftables and routes want it.
    pub fn network_cidr(&self) -> String {
        format!("{}/{}", self.network(), self.prefix_len)
    }

    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & self.mask() == u32::from(self.network())
    }

    /// How many addresses guests can get: every host address except the gateway.
    pub fn capacity(&self) -> u64 {
        (1u64 << (32 - u32::from(self.prefix_len))) - 3
    }

    /// Why `ip` cannot be a guest's address, or `None` if it can.
    fn reserved_reason(&self, ip: Ipv4Addr) -> Option<&'static str> {
        if !self.contains(ip) {
            Some("outside the subnet")
        } else if ip == self.network() {
            Some("network address")
        } else if ip == self.broadcast() {
            Some("broadcast address")
        } else if ip == self.gateway {
            Some("the bridge's own address")
        } else {
            None
        }
    }

    /// The lowest guest address not in `leased`. Lowest-first keeps addresses small and predictable, and
    /// reuses an address as soon as its VM is gone.
    pub fn allocate(
        &self,
        leased: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Lease, AllocError> {
        let leased: HashSet<Ipv4Addr> = leased.into_iter().collect();
        let first = u32::from(self.network()) + 1;
        let last = u32::from(self.broadcast()) - 1;
        (first..=last)
            .map(Ipv4Addr::from)
            .find(|ip| *ip != self.gateway && !leased.contains(ip))
            .map(|ip| Lease { ip, subnet: *self })
            .ok_or(AllocError::NoFreeAddress {
                subnet: *self,
                capacity: self.capacity(),
            })
    }

    /// Rebuilds a lease from an address read back from the store, checking it still fits this subnet.
    pub fn lease(&self, ip: Ipv4Addr) -> Result<Lease, AllocError> {
        match self.reserved_reason(ip) {
            Some(reason) => Err(AllocError::NotAGuestAddress {
                ip,
                subnet: *self,
                reason,
            }),
            None => Ok(Lease { ip, subnet: *self }),
        }
    }
}

impl Default for Subnet {
    fn default() -> Self {
        Subnet::DEFAULT
    }
}

impl fmt::Display for Subnet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.gateway, self.prefix_len)
    }
}

impl FromStr for Subnet {
    type Err = SubnetError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let syntax = || SubnetError::Syntax {
            input: input.to_owned(),
        };
        let (ip, prefix) = input.trim().split_once('/').ok_or_else(syntax)?;
        let ip: Ipv4Addr = ip.parse().map_err(|_| syntax())?;
        let prefix_len: u8 = prefix.parse().map_err(|_| syntax())?;
        Subnet::new(ip, prefix_len).map_err(|e| match e {
            SubnetError::PrefixLength { prefix_len, .. } => SubnetError::PrefixLength {
                input: input.to_owned(),
                prefix_len,
            },
            SubnetError::GatewayNotHost {
                gateway,
                what,
                suggestion,
                prefix_len,
                ..
            } => SubnetError::GatewayNotHost {
                input: input.to_owned(),
                gateway,
                what,
                suggestion,
                prefix_len,
            },
            SubnetError::Syntax { .. } => syntax(),
        })
    }
}

/// A guest's address inside the bridge subnet. Only `Subnet` makes one, so a `Lease` is always a usable
/// host address (never the network, broadcast or gateway address).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Lease {
    ip: Ipv4Addr,
    subnet: Subnet,
}

impl Lease {
    pub fn ip(&self) -> Ipv4Addr {
        self.ip
    }

    pub fn subnet(&self) -> Subnet {
        self.subnet
    }

    pub fn gateway(&self) -> Ipv4Addr {
        self.subnet.gateway()
    }

    /// The guest's MAC, derived from its address so the pair never drifts apart across restarts.
    pub fn mac(&self) -> Mac {
        Mac::for_ip(self.ip)
    }
}

/// `172.16.0.2/24`: the form the guest's `banger.ip=` boot argument carries.
impl fmt::Display for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.ip, self.subnet.prefix_len())
    }
}

/// An Ethernet address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac([u8; 6]);

impl Mac {
    /// First two octets of every guest MAC. `0x02` sets the locally-administered bit and clears the
    /// multicast bit, so these never collide with vendor-assigned addresses; `0xba` marks banger.
    pub const PREFIX: [u8; 2] = [0x02, 0xba];

    /// `02:ba:` followed by the four octets of the IPv4 address: unique per address and stable.
    pub fn for_ip(ip: Ipv4Addr) -> Self {
        let [a, b, c, d] = ip.octets();
        let [p, q] = Self::PREFIX;
        Mac([p, q, a, b, c, d])
    }

    pub fn octets(&self) -> [u8; 6] {
        self.0
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let [a, b, c, d, e, g] = self.0;
        write!(f, "{a:02x}:{b:02x}:{c:02x}:{d:02x}:{e:02x}:{g:02x}")
    }
}

/// A string that is not a MAC of the form `aa:bb:cc:dd:ee:ff`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("MAC {0:?} is not of the form aa:bb:cc:dd:ee:ff")]
pub struct MacError(String);

impl FromStr for Mac {
    type Err = MacError;

    /// Six colon-separated pairs of hex digits, either case (the store keeps what `Display`
    /// wrote, so this reads it back).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || MacError(s.to_owned());
        let mut octets = [0u8; 6];
        let mut parts = s.split(':');
        for octet in &mut octets {
            let part = parts.next().ok_or_else(bad)?;
            if part.len() != 2 || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *octet = u8::from_str_radix(part, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Mac(octets))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> Ipv4Addr {
        s.parse().unwrap()
    }

    #[test]
    fn default_subnet_is_the_documented_one() {
        let s = Subnet::default();
        assert_eq!(s.to_string(), "172.16.0.1/24");
        assert_eq!(s.gateway(), ip("172.16.0.1"));
        assert_eq!(s.network_cidr(), "172.16.0.0/24");
        assert_eq!(s.broadcast(), ip("172.16.0.255"));
        assert_eq!(s.capacity(), 253);
        assert_eq!("172.16.0.1/24".parse::<Subnet>().unwrap(), s);
    }

    #[test]
    fn first_lease_skips_network_and_gateway() {
        let lease = Subnet::DEFAULT.allocate([]).unwrap();
        assert_eq!(lease.ip(), ip("172.16.0.2"));
        assert_eq!(lease.to_string(), "172.16.0.2/24");
        assert_eq!(lease.gateway(), ip("172.16.0.1"));
    }

    #[test]
    fn allocation_takes_the_lowest_free_address_and_reuses_holes() {
        let s = Subnet::DEFAULT;
        let leased = [ip("172.16.0.2"), ip("172.16.0.3"), ip("172.16.0.5")];
        assert_eq!(s.allocate(leased).unwrap().ip(), ip("172.16.0.4"));
    }

    #[test]
    fn gateway_in_the_middle_is_skipped() {
        let s: Subnet = "10.0.0.3/29".parse().unwrap();
        let got: Vec<_> = (0..4)
            .scan(Vec::new(), |leased, _| {
                let l = s.allocate(leased.clone()).ok()?;
                leased.push(l.ip());
                Some(l.ip())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                ip("10.0.0.1"),
                ip("10.0.0.2"),
                ip("10.0.0.4"),
                ip("10.0.0.5")
            ]
        );
    }

    #[test]
    fn full_subnet_says_which_subnet_and_which_key_to_change() {
        let s: Subnet = "192.168.7.1/30".parse().unwrap();
        // A /30 has two host addresses; one is the gateway.
        assert_eq!(s.allocate([]).unwrap().ip(), ip("192.168.7.2"));
        let err = s.allocate([ip("192.168.7.2")]).unwrap_err();
        assert_eq!(
            err,
            AllocError::NoFreeAddress {
                subnet: s,
                capacity: 1
            }
        );
        let msg = err.to_string();
        assert!(msg.contains("192.168.7.1/30"), "{msg}");
        let hint = err.hint().unwrap();
        assert!(hint.contains("`bridge_subnet`"), "{hint}");
        assert!(hint.contains("\"192.168.7.1/26\""), "{hint}");
    }

    #[test]
    fn never_hands_out_broadcast() {
        let s: Subnet = "10.1.0.1/29".parse().unwrap();
        let all: Vec<Ipv4Addr> = (2..=6).map(|d| Ipv4Addr::new(10, 1, 0, d)).collect();
        assert!(s.allocate(all).is_err());
    }

    #[test]
    fn subnet_syntax_errors_name_the_key() {
        for bad in ["172.16.0.1", "172.16.0.1/", "nope/24", "172.16.0.1/33x", ""] {
            let err = bad.parse::<Subnet>().unwrap_err();
            assert!(matches!(err, SubnetError::Syntax { .. }), "{bad}: {err:?}");
            assert!(err.to_string().contains("`bridge_subnet`"));
        }
        let err = "172.16.0.1/31".parse::<Subnet>().unwrap_err();
        assert!(matches!(
            err,
            SubnetError::PrefixLength { prefix_len: 31, .. }
        ));
        let err = "172.16.0.1/0".parse::<Subnet>().unwrap_err();
        assert!(matches!(
            err,
            SubnetError::PrefixLength { prefix_len: 0, .. }
        ));
    }

    #[test]
    fn gateway_must_be_a_host_address() {
        let err = "172.16.0.0/24".parse::<Subnet>().unwrap_err();
        assert!(err.hint().unwrap().contains("\"172.16.0.1/24\""), "{err}");
        let err = "172.16.0.255/24".parse::<Subnet>().unwrap_err();
        assert!(matches!(
            err,
            SubnetError::GatewayNotHost {
                what: "broadcast",
                ..
            }
        ));
    }

    #[test]
    fn lease_from_store_is_checked_against_the_subnet() {
        let s = Subnet::DEFAULT;
        assert_eq!(s.lease(ip("172.16.0.9")).unwrap().ip(), ip("172.16.0.9"));
        for bad in ["172.16.0.1", "172.16.0.0", "172.16.0.255", "10.0.0.2"] {
            assert!(s.lease(ip(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn mac_parses_what_it_displays_and_nothing_else() {
        let mac = Mac::for_ip(ip("172.16.0.2"));
        assert_eq!(mac.to_string().parse::<Mac>(), Ok(mac));
        assert_eq!(
            "06:00:AC:10:00:02".parse::<Mac>().map(|m| m.octets()),
            Ok([6, 0, 0xac, 0x10, 0, 2])
        );
        for bad in [
            "",
            "06:00:ac:10:00",
            "06-00-ac-10-00-02",
            "06:00:ac:10:00:2",
            "06:00:ac:10:00:02:03",
            "+6:00:ac:10:00:02",
        ] {
            let err = bad.parse::<Mac>().unwrap_err();
            assert!(
                err.to_string().contains("aa:bb:cc:dd:ee:ff"),
                "{bad:?}: {err}"
            );
        }
    }

    #[test]
    fn mac_is_locally_administered_unicast_and_stable() {
        let lease = Subnet::DEFAULT.lease(ip("172.16.0.2")).unwrap();
        let mac = lease.mac();
        assert_eq!(mac.to_string(), "02:ba:ac:10:00:02");
        assert_eq!(mac, Mac::for_ip(ip("172.16.0.2")));
        let first = mac.octets()[0];
        assert_eq!(first & 0b10, 0b10, "locally administered bit");
        assert_eq!(first & 0b01, 0, "unicast");
        assert_ne!(
            Mac::for_ip(ip("172.16.0.3")),
            mac,
            "distinct IPs, distinct MACs"
        );
    }
}
