//! `SystemHostNet`: the real `HostNet`, built on iproute2 (`ip -j`) and `nft`.
//!
//! Link state is read with one unprivileged `ip -j -d addr show` (links, kinds, masters, flags and
//! addresses in one JSON document) and every step first compares that state with what is wanted, so
//! running a step twice changes nothing the second time. We shell out to `ip` rather than speak
//! rtnetlink: the commands are exactly what an admin would type, they work unchanged through `sudo -n`,
//! and they keep this crate free of an async netlink stack for a handful of calls. Changes go through
//! [`PrivilegedRunner`]; taps are created with ioctls when root (see `tun.rs`).
//!
//! Everything acts on the network namespace of the calling process, which is what lets the tests run it
//! for real inside a throwaway namespace.

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use nix::unistd::Uid;
use serde::Deserialize;

use crate::addr::Subnet;
use crate::host::{Changes, HostNet, NetError};
use crate::names::{BridgeName, TapName, TAP_PREFIX};
use crate::names::{BridgeOwner, Ownership};
use crate::nat::{self, NatRuleset, PortGuard, GUARD_FAMILY, NFT_FAMILY};
use crate::privileged::{query, PrivilegedRunner};
use crate::service::BridgeConfig;

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";
const LINKS_COMMAND: &str = "ip -j -d addr show";

/// The real host network of one daemon, acting on the current network namespace: its bridge
/// (marked with its owner), its taps and its pair of nft tables (named after the bridge).
#[derive(Debug, Clone)]
pub struct SystemHostNet {
    privileged: PrivilegedRunner,
    /// The name of this daemon's nft tables.
    table: String,
    bridge: BridgeName,
    owner: BridgeOwner,
}

impl SystemHostNet {
    /// The network `config` describes (its bridge, tables and owner).
    pub fn new(privileged: PrivilegedRunner, config: &BridgeConfig) -> Self {
        SystemHostNet {
            privileged,
            table: nat::table_name(&config.bridge),
            bridge: config.bridge.clone(),
            owner: config.owner.clone(),
        }
    }

    pub fn privileged(&self) -> &PrivilegedRunner {
        &self.privileged
    }

    fn links(&self) -> Result<Vec<Link>, NetError> {
        let out = query("list links", &["ip", "-j", "-d", "addr", "show"])?;
        parse_links(&out)
    }

    /// Refuses a subnet that overlaps a route the host already has (other than one on banger's
    /// own bridge): guests would shadow that network, or it theirs.
    fn refuse_overlapping_routes(&self, bridge: &str, subnet: &Subnet) -> Result<(), NetError> {
        let out = query("list routes", &["ip", "-j", "-4", "route", "show"])?;
        let routes: Vec<Route> = serde_json::from_str(&out).map_err(|source| NetError::Parse {
            what: "routes",
            command: "ip -j -4 route show",
            source,
        })?;
        for r in routes {
            if r.dev.as_deref() == Some(bridge) || r.dst == "default" {
                continue;
            }
            let Some((net, len)) = parse_cidr(&r.dst) else {
                continue;
            };
            if cidrs_overlap(net, len, subnet.network(), subnet.prefix_len()) {
                let via = r.dev.map(|d| format!(" dev {d}")).unwrap_or_default();
                return Err(NetError::SubnetOverlap {
                    subnet: *subnet,
                    route: format!("{}{via}", r.dst),
                });
            }
        }
        Ok(())
    }

    /// Whether banger's `inet` and `bridge` tables exist.
    fn nft_tables(&self) -> Result<(bool, bool), NetError> {
        let out = self
            .privileged
            .run("list nft tables", &["nft", "-j", "list", "tables"], None)?;
        Ok((
            has_banger_table(&out, NFT_FAMILY, &self.table)?,
            has_banger_table(&out, GUARD_FAMILY, &self.table)?,
        ))
    }

    fn nft_script(&self, op: &'static str, script: &str) -> Result<(), NetError> {
        self.privileged
            .run(op, &["nft", "-f", "-"], Some(script.as_bytes()))?;
        Ok(())
    }

    fn ip(&self, op: &'static str, args: &[&str]) -> Result<(), NetError> {
        let argv: Vec<&str> = std::iter::once("ip").chain(args.iter().copied()).collect();
        self.privileged.run(op, &argv, None)?;
        Ok(())
    }
}

impl HostNet for SystemHostNet {
    fn ensure_bridge(&self, bridge: &BridgeName, subnet: &Subnet) -> Result<Changes, NetError> {
        let name = bridge.as_str();
        let mut changes = Changes::none();
        let links = self.links()?;
        // A bridge an older banger made has no mark yet, but carries banger's taps.
        let has_our_taps = links
            .iter()
            .any(|l| l.master.as_deref() == Some(name) && l.ifname.starts_with(TAP_PREFIX));
        let alias = self.owner.alias();
        let link = match links.into_iter().find(|l| l.ifname == name) {
            Some(link) if link.kind() == "bridge" => {
                match self.owner.ownership(link.ifalias.as_deref()) {
                    Ownership::Mine => link,
                    Ownership::Other(owner) => {
                        return Err(NetError::OtherDaemon {
                            name: name.to_owned(),
                            owner,
                        })
                    }
                    // Someone else's bridge (the host's `br0`, say): using it would put guests on
                    // that network, and tearing it down later would cut the host off it.
                    Ownership::Foreign if !has_our_taps => {
                        return Err(NetError::NotOurs {
                            name: name.to_owned(),
                        })
                    }
                    // Made by a banger that did not yet name the owner, or (no mark at all)
                    // one that did not mark bridges, still carrying its taps: this daemon's
                    // from now on.
                    Ownership::Unclaimed | Ownership::Foreign => {
                        self.ip(
                            "mark bridge as banger's",
                            &["link", "set", "dev", name, "alias", &alias],
                        )?;
                        changes.push(format!("marked {name} as this banger's"));
                        link
                    }
                }
            }
            Some(link) => {
                return Err(NetError::NotABridge {
                    name: name.to_owned(),
                    kind: link.kind_description(),
                })
            }
            None => {
                self.refuse_overlapping_routes(name, subnet)?;
                self.ip(
                    "create bridge",
                    &["link", "add", "name", name, "type", "bridge"],
                )?;
                if let Err(e) = self.ip(
                    "mark bridge as banger's",
                    &["link", "set", "dev", name, "alias", &alias],
                ) {
                    // Unmarked, it would be refused (and never removed) from now on.
                    let _ = self.ip("delete bridge", &["link", "del", "dev", name]);
                    return Err(e);
                }
                changes.push(format!("created bridge {name}"));
                Link::named(name, Some(alias.clone()))
            }
        };

        let gateway = subnet.gateway().to_string();
        if !link.has_ipv4(&gateway, subnet.prefix_len()) {
            let cidr = subnet.to_string();
            self.ip("set bridge address", &["addr", "add", &cidr, "dev", name])?;
            changes.push(format!("assigned {cidr} to {name}"));
        }
        if !link.is_up() {
            self.ip("bring bridge up", &["link", "set", "dev", name, "up"])?;
            changes.push(format!("brought {name} up"));
        }
        Ok(changes)
    }

    fn enable_ip_forwarding(&self) -> Result<Changes, NetError> {
        let current = fs_err::read_to_string(IP_FORWARD).map_err(NetError::Forwarding)?;
        if current.trim() == "1" {
            return Ok(Changes::none());
        }
        self.privileged
            .write_file("enable IPv4 forwarding", Path::new(IP_FORWARD), "1\n")?;
        let mut changes = Changes::none();
        changes.push("enabled IPv4 forwarding");
        Ok(changes)
    }

    fn ensure_nat(&self, ruleset: &NatRuleset) -> Result<Changes, NetError> {
        let mut changes = Changes::none();
        let (inet, guard) = self.nft_tables()?;
        if inet && guard {
            // Terse (`-t`, no set elements): the DNS limits' and the guard's sets fill and
            // empty as guests come and go; only the rules count.
            let mut listing = self.privileged.run(
                "read banger nft table",
                &["nft", "-t", "list", "table", NFT_FAMILY, &self.table],
                None,
            )?;
            listing.push_str(&self.privileged.run(
                "read banger nft table",
                &["nft", "-t", "list", "table", GUARD_FAMILY, &self.table],
                None,
            )?);
            if ruleset.matches_listing(&listing) {
                return Ok(changes);
            }
        }
        self.nft_script("install banger nft tables", &ruleset.install_script())?;
        changes.push(if inet || guard {
            format!("replaced nft tables {NFT_FAMILY} {t}, {GUARD_FAMILY} {t} (they differed from banger's)", t = self.table)
        } else {
            format!("created nft tables {NFT_FAMILY} {t}, {GUARD_FAMILY} {t}", t = self.table)
        });
        Ok(changes)
    }

    fn create_tap(
        &self,
        tap: &TapName,
        owner: Uid,
        bridge: &BridgeName,
    ) -> Result<Changes, NetError> {
        let name = tap.as_str();
        let mut changes = Changes::none();
        let link = self.links()?.into_iter().find(|l| l.ifname == name);
        let link = match link {
            Some(link) if link.is_tap() => link,
            Some(link) => {
                return Err(NetError::NotATap {
                    name: name.to_owned(),
                    kind: link.kind_description(),
                })
            }
            None => {
                self.privileged.create_tap("create tap", tap, owner)?;
                changes.push(format!("created tap {name} owned by uid {owner}"));
                Link::named(name, None)
            }
        };
        let group = self.owner.group().to_string();
        if link.master.as_deref() != Some(bridge.as_str())
            || !link.is_up()
            || link.group.as_deref() != Some(group.as_str())
        {
            // In this daemon's interface group before it is up: its bridge table polices it
            // (and other daemons' tables leave it to this one).
            self.ip(
                "attach tap to bridge",
                &[
                    "link",
                    "set",
                    "dev",
                    name,
                    "group",
                    &group,
                    "master",
                    bridge.as_str(),
                    "up",
                ],
            )?;
            changes.push(format!("attached {name} to {bridge} and brought it up"));
        }
        Ok(changes)
    }

    fn delete_tap(&self, tap: &TapName) -> Result<Changes, NetError> {
        let name = tap.as_str();
        let mut changes = Changes::none();
        match self.links()?.into_iter().find(|l| l.ifname == name) {
            None => {}
            Some(link) if link.is_tap() => {
                self.ip("delete tap", &["link", "del", "dev", name])?;
                changes.push(format!("deleted tap {name}"));
            }
            Some(link) => {
                return Err(NetError::NotATap {
                    name: name.to_owned(),
                    kind: link.kind_description(),
                })
            }
        }
        Ok(changes)
    }

    fn list_taps(&self) -> Result<Vec<TapName>, NetError> {
        // Taps on another bridge are another banger daemon's; unattached ones are listed
        // (a tap is attached right after it is made, so one left unattached is a leftover).
        let links = self.links()?;
        let mine: Vec<Link> = links
            .into_iter()
            .filter(|l| l.master.is_none() || l.master.as_deref() == Some(self.bridge.as_str()))
            .collect();
        Ok(banger_taps(&mine))
    }

    fn guard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError> {
        // Adding an element that is there already changes nothing: no need to look first.
        self.nft_script("guard tap", &nat::guard_script(&self.table, tap, guard))?;
        let mut changes = Changes::none();
        changes.push(format!(
            "{tap} may send from {} {} only",
            guard.mac, guard.ip
        ));
        Ok(changes)
    }

    fn unguard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError> {
        let mut changes = Changes::none();
        // The script adds, then deletes, each element: it succeeds whether or not they were
        // there, as long as the tables are.
        if self.nft_tables()? == (true, true) {
            self.nft_script("unguard tap", &nat::unguard_script(&self.table, tap, guard))?;
            changes.push(format!(
                "{tap} no longer sends from {} {}",
                guard.mac, guard.ip
            ));
        }
        Ok(changes)
    }

    fn allow_outbound(
        &self,
        guest: Ipv4Addr,
        destinations: &[Ipv4Addr],
        ttl: Duration,
    ) -> Result<(), NetError> {
        if destinations.is_empty() {
            return Ok(());
        }
        self.nft_script(
            "allow a guest's destinations",
            &nat::allow_script(&self.table, guest, destinations, ttl),
        )
    }

    fn forget_outbound(&self, guest: Ipv4Addr) -> Result<Changes, NetError> {
        let mut changes = Changes::none();
        if !self.nft_tables()?.0 {
            return Ok(changes);
        }
        let out = self.privileged.run(
            "list a guest's allowed destinations",
            &[
                "nft",
                "-j",
                "list",
                "set",
                NFT_FAMILY,
                &self.table,
                nat::EGRESS_ALLOWED_SET,
            ],
            None,
        )?;
        let listing: serde_json::Value =
            serde_json::from_str(&out).map_err(|source| NetError::Parse {
                what: "the allowed destinations",
                command: "nft -j list set inet banger egress_allowed",
                source,
            })?;
        let gone = nat::allowed_destinations(&listing, guest);
        if !gone.is_empty() {
            self.nft_script(
                "forget a guest's destinations",
                &nat::forget_script(&self.table, guest, &gone),
            )?;
            changes.push(format!(
                "{guest} may no longer reach the {} address(es) its DNS answers allowed",
                gone.len()
            ));
        }
        Ok(changes)
    }

    fn teardown(&self, bridge: &BridgeName) -> Result<Changes, NetError> {
        let mut changes = Changes::none();
        let name = bridge.as_str();
        let delete_bridge = match self.links()?.into_iter().find(|l| l.ifname == name) {
            None => false,
            Some(link)
                if link.kind() == "bridge"
                    && matches!(
                        self.owner.ownership(link.ifalias.as_deref()),
                        Ownership::Mine | Ownership::Unclaimed
                    ) =>
            {
                true
            }
            // Not this banger's (ensure_bridge refused to use it): neither the bridge nor the
            // tables named after it, which are its owner's, are touched.
            Some(link) if link.kind() == "bridge" => return Ok(changes),
            Some(link) => {
                return Err(NetError::NotABridge {
                    name: name.to_owned(),
                    kind: link.kind_description(),
                })
            }
        };
        let (inet, guard) = self.nft_tables()?;
        if inet || guard {
            self.nft_script("delete banger nft tables", &nat::delete_script(&self.table))?;
            changes.push(format!(
                "deleted nft tables {NFT_FAMILY} {t}, {GUARD_FAMILY} {t}",
                t = self.table
            ));
        }
        if delete_bridge {
            self.ip("delete bridge", &["link", "del", "dev", name])?;
            changes.push(format!("deleted bridge {name}"));
        }
        Ok(changes)
    }
}

/// One entry of `ip -j -d addr show`; only the fields banger reads.
#[derive(Debug, Deserialize)]
struct Link {
    ifname: String,
    #[serde(default)]
    flags: Vec<String>,
    #[serde(default)]
    master: Option<String>,
    #[serde(default)]
    linkinfo: Option<LinkInfo>,
    #[serde(default)]
    addr_info: Vec<AddrInfo>,
    /// `ip link set dev NAME alias ...`: how banger marks the bridge it created.
    #[serde(default)]
    ifalias: Option<String>,
    /// The interface group, as a number or its name (`default` for 0).
    #[serde(default)]
    group: Option<String>,
}

/// One entry of `ip -j -4 route show`; only the fields banger reads.
#[derive(Debug, Deserialize)]
struct Route {
    dst: String,
    #[serde(default)]
    dev: Option<String>,
}

/// `10.0.0.0/8` or a bare address (a /32 host route).
fn parse_cidr(text: &str) -> Option<(std::net::Ipv4Addr, u8)> {
    let (ip, len) = match text.split_once('/') {
        Some((ip, len)) => (ip, len.parse().ok()?),
        None => (text, 32),
    };
    (len <= 32).then_some(())?;
    Some((ip.parse().ok()?, len))
}

/// Two IPv4 prefixes overlap when the shorter one contains the other's network address.
fn cidrs_overlap(a: std::net::Ipv4Addr, a_len: u8, b: std::net::Ipv4Addr, b_len: u8) -> bool {
    let len = a_len.min(b_len);
    let mask = if len == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(len))
    };
    u32::from(a) & mask == u32::from(b) & mask
}

#[derive(Debug, Deserialize)]
struct LinkInfo {
    #[serde(default)]
    info_kind: Option<String>,
    #[serde(default)]
    info_data: Option<serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct AddrInfo {
    #[serde(default)]
    family: Option<String>,
    #[serde(default)]
    local: Option<String>,
    #[serde(default)]
    prefixlen: Option<u8>,
}

impl Link {
    /// A link we have just created: no address, down, no master.
    fn named(name: &str, alias: Option<String>) -> Link {
        Link {
            ifname: name.to_owned(),
            flags: Vec::new(),
            master: None,
            linkinfo: None,
            addr_info: Vec::new(),
            ifalias: alias,
            group: None,
        }
    }

    /// The kernel's link kind (`bridge`, `tun`, `veth`, ...), empty for devices without one.
    fn kind(&self) -> &str {
        self.linkinfo
            .as_ref()
            .and_then(|i| i.info_kind.as_deref())
            .unwrap_or("")
    }

    fn tun_type(&self) -> Option<&str> {
        self.linkinfo
            .as_ref()?
            .info_data
            .as_ref()?
            .get("type")?
            .as_str()
    }

    fn is_tap(&self) -> bool {
        self.kind() == "tun" && self.tun_type() == Some("tap")
    }

    fn kind_description(&self) -> String {
        match (self.kind(), self.tun_type()) {
            ("", _) => "device without a link kind (physical or loopback)".to_owned(),
            ("tun", Some(t)) => format!("{t} device"),
            (kind, _) => format!("{kind} device"),
        }
    }

    fn is_up(&self) -> bool {
        self.flags.iter().any(|f| f == "UP")
    }

    fn has_ipv4(&self, local: &str, prefix_len: u8) -> bool {
        self.addr_info.iter().any(|a| {
            a.family.as_deref() == Some("inet")
                && a.local.as_deref() == Some(local)
                && a.prefixlen == Some(prefix_len)
        })
    }
}

fn parse_links(json: &str) -> Result<Vec<Link>, NetError> {
    if json.trim().is_empty() {
        return Ok(Vec::new());
    }
    serde_json::from_str(json).map_err(|source| NetError::Parse {
        what: "links",
        command: LINKS_COMMAND,
        source,
    })
}

fn banger_taps(links: &[Link]) -> Vec<TapName> {
    let mut taps: Vec<TapName> = links
        .iter()
        .filter(|l| l.is_tap() && l.ifname.starts_with(TAP_PREFIX))
        .filter_map(|l| match TapName::parse(&l.ifname) {
            Ok(tap) => Some(tap),
            Err(err) => {
                tracing::warn!(%err, "ignoring tap with banger's prefix but an unusable name");
                None
            }
        })
        .collect();
    taps.sort();
    taps
}

#[derive(Debug, Deserialize)]
struct NftDocument {
    nftables: Vec<serde_json::Value>,
}

fn has_banger_table(json: &str, family: &str, table: &str) -> Result<bool, NetError> {
    let doc: NftDocument = serde_json::from_str(json).map_err(|source| NetError::Parse {
        what: "nft tables",
        command: "nft -j list tables",
        source,
    })?;
    Ok(doc.nftables.iter().any(|item| {
        item.get("table").is_some_and(|t| {
            t.get("family").and_then(|f| f.as_str()) == Some(family)
                && t.get("name").and_then(|n| n.as_str()) == Some(table)
        })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_overlap_when_one_contains_the_other() {
        let ip = |s: &str| s.parse::<std::net::Ipv4Addr>().unwrap();
        assert!(cidrs_overlap(ip("172.16.0.0"), 12, ip("172.16.0.0"), 24));
        assert!(cidrs_overlap(ip("172.16.0.0"), 24, ip("172.16.0.0"), 12));
        assert!(cidrs_overlap(ip("172.16.0.77"), 32, ip("172.16.0.0"), 24));
        assert!(!cidrs_overlap(ip("172.17.0.0"), 16, ip("172.16.0.0"), 24));
        assert!(!cidrs_overlap(ip("10.0.0.0"), 8, ip("172.16.0.0"), 24));
        assert!(cidrs_overlap(ip("0.0.0.0"), 0, ip("172.16.0.0"), 24));
        assert_eq!(parse_cidr("10.1.0.0/16"), Some((ip("10.1.0.0"), 16)));
        assert_eq!(parse_cidr("10.1.2.3"), Some((ip("10.1.2.3"), 32)));
        assert_eq!(parse_cidr("10.1.0.0/33"), None);
        assert_eq!(parse_cidr("default"), None);
    }

    // Trimmed from real `ip -j -d addr show` output (iproute2 6.1).
    const LINKS: &str = r#"[
      {"ifindex":1,"ifname":"lo","flags":["LOOPBACK","UP","LOWER_UP"],"addr_info":[
        {"family":"inet","local":"127.0.0.1","prefixlen":8}]},
      {"ifindex":2,"ifname":"banger0","flags":["NO-CARRIER","BROADCAST","MULTICAST","UP"],
       "linkinfo":{"info_kind":"bridge","info_data":{"stp_state":0}},
       "addr_info":[{"family":"inet","local":"172.16.0.1","prefixlen":24},
                    {"family":"inet6","local":"fe80::1","prefixlen":64}]},
      {"ifindex":3,"ifname":"bg-b","flags":["BROADCAST","UP"],"master":"banger0",
       "linkinfo":{"info_kind":"tun","info_data":{"type":"tap","pi":false,"persist":true,"user":"1000"},
                   "info_slave_kind":"bridge"},"addr_info":[]},
      {"ifindex":4,"ifname":"bg-a","flags":["BROADCAST"],
       "linkinfo":{"info_kind":"tun","info_data":{"type":"tap"}},"addr_info":[]},
      {"ifindex":5,"ifname":"bg-tun","flags":[],
       "linkinfo":{"info_kind":"tun","info_data":{"type":"tun"}},"addr_info":[]},
      {"ifindex":6,"ifname":"bg-veth","flags":[],"linkinfo":{"info_kind":"veth"},"addr_info":[]},
      {"ifindex":7,"ifname":"tap0","flags":[],
       "linkinfo":{"info_kind":"tun","info_data":{"type":"tap"}},"addr_info":[]}
    ]"#;

    #[test]
    fn parses_bridge_state_from_ip_json() {
        let links = parse_links(LINKS).unwrap();
        let br = links.iter().find(|l| l.ifname == "banger0").unwrap();
        assert_eq!(br.kind(), "bridge");
        assert!(br.is_up());
        assert!(br.has_ipv4("172.16.0.1", 24));
        assert!(!br.has_ipv4("172.16.0.1", 16));
        assert!(!br.has_ipv4("fe80::1", 64));
        let lo = links.iter().find(|l| l.ifname == "lo").unwrap();
        assert_eq!(lo.kind(), "");
        assert!(lo.kind_description().contains("physical or loopback"));
    }

    #[test]
    fn only_banger_prefixed_taps_are_listed() {
        let links = parse_links(LINKS).unwrap();
        let taps: Vec<String> = banger_taps(&links).iter().map(|t| t.to_string()).collect();
        assert_eq!(taps, ["bg-a", "bg-b"]);
        let tun = links.iter().find(|l| l.ifname == "bg-tun").unwrap();
        assert!(!tun.is_tap());
        assert_eq!(tun.kind_description(), "tun device");
    }

    #[test]
    fn bad_ip_output_is_a_parse_error_naming_the_command() {
        let err = parse_links("not json").unwrap_err();
        assert!(err.to_string().contains("ip -j -d addr show"), "{err}");
        assert!(parse_links("").unwrap().is_empty());
    }

    #[test]
    fn finds_bangers_table_among_others() {
        let with = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "ip", "name": "banger", "handle": 1}},
            {"table": {"family": "inet", "name": "banger", "handle": 3}}]}"#;
        assert!(has_banger_table(with, NFT_FAMILY, "banger").unwrap());
        let without = r#"{"nftables": [{"metainfo": {"version": "1.0.6"}},
            {"table": {"family": "inet", "name": "filter", "handle": 1}}]}"#;
        assert!(!has_banger_table(without, NFT_FAMILY, "banger").unwrap());
        assert!(has_banger_table("garbage", NFT_FAMILY, "banger").is_err());
    }
}
