//! The nftables ruleset banger owns: one table, `inet banger`, generated here as plain nft syntax.
//!
//! We generate text for `nft -f -` rather than JSON through the `nftables` crate: the text is what a
//! person sees in `nft list table inet banger`, so the same string serves as the install script, the
//! expected listing for the "is it already right?" check, and the snapshot in tests. Installing is a
//! single `nft -f -` transaction that declares, deletes and re-creates the table, so the table is
//! replaced as a whole, atomically, and never half-written. Nothing outside this table is touched.
//!
//! What the table does: masquerade traffic from the guest subnet that leaves through any interface other
//! than the bridge, and accept forwarding bridge -> elsewhere plus the replies coming back (with
//! `isolate`, never bridge -> bridge: routing through the host would get around it). Guests are
//! kept away from the host itself: what arrives from the bridge for a host address is dropped unless
//! it answers a connection the host opened or is DNS for the `.vm` server ([`HostAccess::DnsOnly`],
//! the default; `host_access = true` opens the host, [`HostAccess::Open`]). Link-local addresses
//! (169.254.0.0/16, where clouds serve instance metadata and credentials) are dropped from guests
//! always, whether they are the host's own or lie beyond it. A second table, `bridge banger` (the
//! inet family never sees frames one bridge port sends another), keeps each guest to its own
//! addresses: a frame from a banger tap passes only if its Ethernet source, and for IPv4 its source
//! address, for ARP its sender MAC and address, are the ones of that tap's VM ([`PortGuard`],
//! added to the set `guests` when the tap is attached). Anything else a tap sends (IPv6 included:
//! banger does not serve it) is dropped. It also
//! sends DNS (port 53, UDP and TCP) addressed to the bridge address, from guests and from the host
//! itself, to the daemon's `.vm` server on `DNS_SERVE_PORT`: the daemon runs as the user and cannot
//! bind port 53, and the rule only matches the bridge address, so no other resolver is affected. It cannot
//! override a `drop` in another table (nftables evaluates every base chain); `doctor` is where such a
//! conflict gets reported, not here.

use std::net::Ipv4Addr;

use std::time::Duration;

use crate::addr::{Mac, Subnet};
use crate::egress::Outbound;
use crate::names::{BridgeName, BridgeOwner, TapName, TAP_PREFIX};

/// Where clouds serve instance metadata (and with it, often, credentials): never for guests.
pub const LINK_LOCAL_V4: &str = "169.254.0.0/16";

/// What guests may reach on the host itself (config key `host_access`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum HostAccess {
    /// Only the `.vm` DNS server on the bridge address, and replies to connections the host opened
    /// (ssh into a guest, say). Everything else a guest sends to any host address is dropped.
    #[default]
    DnsOnly,
    /// Every service on every host address, for a guest that must reach a dev server on the host.
    /// Link-local (metadata) addresses stay closed.
    Open,
}

/// nftables family of banger's table. `inet` so one table could later carry IPv6 too.
pub const NFT_FAMILY: &str = "inet";
/// Name of banger's tables (one per family).
pub const NFT_TABLE: &str = "banger";

/// The name of the tables of the network on `bridge`: `banger` for the default bridge (as
/// before there could be others), `banger-BRIDGE` for any other. Two daemons on one host use
/// two bridges, hence two pairs of tables, and never replace or delete each other's.
pub fn table_name(bridge: &BridgeName) -> String {
    if *bridge == BridgeName::default() {
        NFT_TABLE.to_owned()
    } else {
        format!("{NFT_TABLE}-{}", bridge.as_str())
    }
}
/// Family of the anti-spoofing table: only the bridge family sees frames between bridge ports.
pub const GUARD_FAMILY: &str = "bridge";
/// The set of (tap, MAC, IPv4 address) each tap may send from.
pub const GUARD_SET: &str = "guests";
/// The set of guest addresses that may reach the host's services (`--host-access`); safe to
/// key by source address because the guard keeps each guest to its own.
pub const HOST_OPEN_SET: &str = "host_open";
/// The set of guests whose traffic beyond the host is limited to [`EGRESS_ALLOWED_SET`]
/// (`egress = "deny"` or an allow-list).
pub const EGRESS_FILTERED_SET: &str = "egress_filtered";
/// `guest . destination` pairs banger's DNS server answered for under an allow-list, each
/// expiring with its record's TTL.
pub const EGRESS_ALLOWED_SET: &str = "egress_allowed";
/// Most `guest . destination` pairs [`EGRESS_ALLOWED_SET`] holds, over all guests: a bound on
/// what lookups can make the kernel (and a listing) hold. When it is full, new answers fail
/// (SERVFAIL) until older pairs expire.
pub const EGRESS_ALLOWED_MAX: u32 = 65535;
/// Guests with `--no-network`: nothing is forwarded from or to them (the inet table, by
/// address; the bridge table, by tap, under the same name).
pub const SEALED_SET: &str = "sealed";
/// Shortest life of an allowed destination: a record with TTL 0 must still be usable for the
/// connection the guest makes right after the answer.
pub const EGRESS_MIN_TTL: Duration = Duration::from_secs(30);
/// Longest life of an allowed destination, whatever the record says.
pub const EGRESS_MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Port the daemon's DNS server binds on the bridge address; port 53 there is DNATed to it.
pub const DNS_SERVE_PORT: u16 = 10053;
/// DNS queries over UDP one guest may send per second (past a burst), counted by nft before
/// they reach the daemon: a flooding guest is slowed at the host's door and the others are not.
pub const DNS_UDP_RATE: u32 = 200;
/// The burst of [`DNS_UDP_RATE`].
pub const DNS_UDP_BURST: u32 = 400;
/// TCP connections to the DNS server one guest may hold at once; more are dropped (a reset is not possible: it would leave from the port after DNAT, not the one the guest asked). Resolvers use
/// TCP rarely and briefly, so this only stops a guest from holding thousands of them open.
pub const DNS_TCP_PER_GUEST: u32 = 32;

/// Whether guests reach each other across the bridge (config key `isolate`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum GuestLinks {
    /// VMs reach each other (and find each other as `NAME.vm`).
    #[default]
    Open,
    /// Nothing passes from one VM's tap to another's; each still reaches the host's DNS and
    /// the outside.
    Isolated,
}

/// What a VM's tap may do: send from its MAC and IPv4 address only (anti-spoofing), and reach
/// the host's services or only its DNS (`vm create --host-access`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct PortGuard {
    pub mac: Mac,
    pub ip: Ipv4Addr,
    pub host: HostAccess,
    pub outbound: Outbound,
}

impl PortGuard {
    /// A port that may send from `mac` and `ip`, and reach the host's DNS only.
    pub fn new(mac: Mac, ip: Ipv4Addr) -> Self {
        PortGuard {
            mac,
            ip,
            host: HostAccess::DnsOnly,
            outbound: Outbound::Open,
        }
    }

    pub fn with_host(self, host: HostAccess) -> Self {
        PortGuard { host, ..self }
    }

    /// Where the guest's traffic may go beyond the host (its egress policy, on the nft side).
    pub fn with_outbound(self, outbound: Outbound) -> Self {
        PortGuard { outbound, ..self }
    }
}

/// The complete `inet banger` and `bridge banger` tables for one bridge and subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRuleset {
    /// The name both tables share (see [`table_name`]).
    name: String,
    table: String,
    guard_table: String,
}

impl NatRuleset {
    pub fn new(bridge: &BridgeName, subnet: &Subnet, access: HostAccess) -> Self {
        Self::with_policy(
            bridge,
            subnet,
            access,
            GuestLinks::Open,
            BridgeOwner::default().group(),
        )
    }

    /// [`NatRuleset::new`], with guests kept apart from each other or not, for the daemon
    /// whose taps are in interface group `group` ([`BridgeOwner::group`]).
    pub fn with_policy(
        bridge: &BridgeName,
        subnet: &Subnet,
        access: HostAccess,
        links: GuestLinks,
        group: u32,
    ) -> Self {
        let isolate = match links {
            GuestLinks::Open => String::new(),
            GuestLinks::Isolated => {
                format!("\t\tiifgroup {group} oifgroup {group} drop\n")
            }
        };
        // Isolated guests must not reach each other through the host's routing either (a
        // frame to the bridge's MAC for another guest's address). Only then: where
        // br_netfilter is loaded (Docker loads it), frames bridged between guests pass this
        // chain too, and open guests must keep reaching each other.
        let routed_between_guests = match links {
            GuestLinks::Open => String::new(),
            GuestLinks::Isolated => format!(
                "\t\tiifname \"{br}\" oifname \"{br}\" drop\n",
                br = bridge.as_str()
            ),
        };
        let closed_host = match access {
            HostAccess::DnsOnly => format!("\t\tiifname \"{}\" drop\n", bridge.as_str()),
            HostAccess::Open => String::new(),
        };
        let name = table_name(bridge);
        // Written exactly as nft 1.0 lists it (tabs, blank line between chains), so a correct table
        // compares equal to its listing without any parsing. Names are safe to embed: `BridgeName`
        // only admits [A-Za-z0-9._-].
        let table = format!(
            "table {NFT_FAMILY} {name} {{\n\
             \tcomment \"managed by banger: replaced as a whole, do not edit\"\n\
             \tset dns_tcp {{\n\
             \t\ttype ipv4_addr\n\
             \t\tsize 65535\n\
             \t\tflags dynamic\n\
             \t}}\n\
             \n\
             \tset {HOST_OPEN_SET} {{\n\
             \t\ttype ipv4_addr\n\
             \t\tcomment \"guests that may reach the host's services (vm create --host-access)\"\n\
             \t}}\n\
             \n\
             \tset dns_udp {{\n\
             \t\ttype ipv4_addr\n\
             \t\tsize 65535\n\
             \t\tflags dynamic,timeout\n\
             \t\ttimeout 10s\n\
             \t}}\n\
             \n\
             \tset {EGRESS_FILTERED_SET} {{\n\
             \t\ttype ipv4_addr\n\
             \t\tcomment \"guests whose traffic beyond the host goes only where {EGRESS_ALLOWED_SET} says\"\n\
             \t}}\n\
             \n\
             \tset {EGRESS_ALLOWED_SET} {{\n\
             \t\ttype ipv4_addr . ipv4_addr\n\
             \t\tsize {EGRESS_ALLOWED_MAX}\n\
             \t\tflags timeout\n\
             \t\tcomment \"guest . destination pairs banger's DNS answered for under an allow-list\"\n\
             \t}}\n\
             \n\
             \tset {SEALED_SET} {{\n\
             \t\ttype ipv4_addr\n\
             \t\tcomment \"guests with --no-network\"\n\
             \t}}\n\
             \n\
             \tchain prerouting {{\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tiifname \"{br}\" ip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {gw}:{DNS_SERVE_PORT}\n\
             \t}}\n\
             \n\
             \tchain output {{\n\
             \t\ttype nat hook output priority -100; policy accept;\n\
             \t\tip daddr {gw} meta l4proto {{ tcp, udp }} th dport 53 dnat ip to {gw}:{DNS_SERVE_PORT}\n\
             \t}}\n\
             \n\
             \tchain postrouting {{\n\
             \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
             \t\tip saddr {net} oifname != \"{br}\" masquerade\n\
             \t}}\n\
             \n\
             \tchain input {{\n\
             \t\ttype filter hook input priority filter; policy accept;\n\
             \t\tiifname \"{br}\" ip daddr {gw} udp dport {DNS_SERVE_PORT} update @dns_udp {{ ip saddr limit rate over {DNS_UDP_RATE}/second burst {DNS_UDP_BURST} packets }} drop\n\
             \t\tiifname \"{br}\" ip daddr {gw} tcp dport {DNS_SERVE_PORT} ct state new add @dns_tcp {{ ip saddr ct count over {DNS_TCP_PER_GUEST} }} drop\n\
             \t\tiifname \"{br}\" ct state established,related accept\n\
             \t\tiifname \"{br}\" ip daddr {gw} meta l4proto {{ tcp, udp }} th dport {DNS_SERVE_PORT} accept\n\
             \t\tiifname \"{br}\" ip daddr {LINK_LOCAL_V4} drop\n\
             \t\tiifname \"{br}\" ip saddr @{HOST_OPEN_SET} accept\n\
             {closed_host}\
             \t}}\n\
             \n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tip saddr @{SEALED_SET} drop\n\
             \t\tip daddr @{SEALED_SET} drop\n\
             {routed_between_guests}\
             \t\tiifname \"{br}\" ip daddr {LINK_LOCAL_V4} drop\n\
             \t\tiifname \"{br}\" oifname != \"{br}\" ip saddr @{EGRESS_FILTERED_SET} ct state established,related accept\n\
             \t\tiifname \"{br}\" oifname != \"{br}\" ip saddr @{EGRESS_FILTERED_SET} ip saddr . ip daddr != @{EGRESS_ALLOWED_SET} drop\n\
             \t\tiifname \"{br}\" oifname != \"{br}\" accept\n\
             \t\toifname \"{br}\" ct state established,related accept\n\
             \t}}\n\
             }}\n",
            net = subnet.network_cidr(),
            gw = subnet.gateway(),
            br = bridge.as_str(),
        );
        // The guard table, as `nft -t list table bridge banger` prints it (`-t`: without the
        // set's elements, which come and go with VMs). nft drops the `ether type` a match on
        // `ip saddr` or `arp saddr` implies, so the rules are written without it.
        let guard_table = format!(
            "table {GUARD_FAMILY} {name} {{\n\
             \tcomment \"managed by banger: replaced as a whole, do not edit\"\n\
             \tset {GUARD_SET} {{\n\
             \t\ttype ifname . ether_addr . ipv4_addr\n\
             \t\tcomment \"each banger tap with the one MAC and IPv4 address its VM may send from\"\n\
             \t}}\n\
             \n\
             \tset {SEALED_SET} {{\n\
             \t\ttype ifname\n\
             \t\tcomment \"taps of guests with --no-network\"\n\
             \t}}\n\
             \n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority filter; policy accept;\n\
             \t\tiifname != \"{TAP_PREFIX}*\" accept\n\
             \t\tiifgroup != {group} iifgroup != 0 accept\n\
             \t\tiifname . ether saddr . ip saddr @{GUARD_SET} accept\n\
             \t\tiifname . ether saddr . arp saddr ip @{GUARD_SET} iifname . arp saddr ether . arp saddr ip @{GUARD_SET} accept\n\
             \t\tdrop\n\
             \t}}\n\
             \n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname @{SEALED_SET} drop\n\
             \t\toifname @{SEALED_SET} drop\n\
             {isolate}\
             \t}}\n\
             }}\n"
        );
        NatRuleset {
            name,
            table,
            guard_table,
        }
    }

    /// The name both tables share.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NAT and filter table, as `nft list table inet banger` prints it.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// The anti-spoofing table, as `nft -t list table bridge banger` prints it.
    pub fn guard_table(&self) -> &str {
        &self.guard_table
    }

    /// Input for `nft -f -` that replaces both tables in one transaction. Declaring a table
    /// first makes its `delete` valid when it does not exist yet. The guard set starts empty:
    /// the caller adds the taps of running VMs again.
    pub fn install_script(&self) -> String {
        format!(
            "table {NFT_FAMILY} {name}\ndelete table {NFT_FAMILY} {name}\n{}\
             table {GUARD_FAMILY} {name}\ndelete table {GUARD_FAMILY} {name}\n{}",
            self.table,
            self.guard_table,
            name = self.name
        )
    }

    /// Whether `listing` (`nft -t list table inet banger` followed by `nft -t list table bridge
    /// banger`: both without set elements) is this ruleset. Whitespace and blank lines are ignored; anything else that
    /// differs (a rule edited by hand, another subnet, a different nft formatting) counts as
    /// different, and the caller replaces the tables, which is always safe.
    pub fn matches_listing(&self, listing: &str) -> bool {
        normalize(listing) == normalize(&format!("{}{}", self.table, self.guard_table))
    }
}

/// Input for `nft -f -` that lets `tap` send from `guard`'s addresses, reach the host if it
/// may, and puts it under its egress policy (adding is idempotent).
pub fn guard_script(table: &str, tap: &TapName, guard: PortGuard) -> String {
    // What a tap may do is replaced, not added to: a VM re-adopted by a daemon with another
    // config (or restarted with other flags) must not keep an earlier policy's membership.
    let mut script = reset_policy(table, tap, guard.ip);
    script.push_str(&format!(
        "add element {GUARD_FAMILY} {table} {GUARD_SET} {{ \"{tap}\" . {} . {} }}\n",
        guard.mac, guard.ip
    ));
    if guard.host == HostAccess::Open {
        script.push_str(&format!(
            "add element {NFT_FAMILY} {table} {HOST_OPEN_SET} {{ {} }}\n",
            guard.ip
        ));
    }
    match guard.outbound {
        Outbound::Open => {}
        Outbound::Filtered => script.push_str(&format!(
            "add element {NFT_FAMILY} {table} {EGRESS_FILTERED_SET} {{ {} }}\n",
            guard.ip
        )),
        Outbound::Sealed => script.push_str(&format!(
            "add element {NFT_FAMILY} {table} {SEALED_SET} {{ {} }}\n\
             add element {GUARD_FAMILY} {table} {SEALED_SET} {{ \"{tap}\" }}\n",
            guard.ip
        )),
    }
    script
}

/// Takes `ip` (and `tap`) out of every policy set: host access, egress filter, sealed. Each
/// element is added first, in the same transaction, so the delete succeeds either way.
fn reset_policy(table: &str, tap: &TapName, ip: Ipv4Addr) -> String {
    let ip = format!("{{ {ip} }}");
    let tap = format!("{{ \"{tap}\" }}");
    let mut script = String::new();
    for (family, set, element) in [
        (NFT_FAMILY, HOST_OPEN_SET, &ip),
        (NFT_FAMILY, EGRESS_FILTERED_SET, &ip),
        (NFT_FAMILY, SEALED_SET, &ip),
        (GUARD_FAMILY, SEALED_SET, &tap),
    ] {
        script.push_str(&format!(
            "add element {family} {table} {set} {element}\n\
             delete element {family} {table} {set} {element}\n"
        ));
    }
    script
}

/// Input for `nft -f -` that takes `tap`'s addresses, its host access and its egress policy
/// out of the sets. Each element is added first, in the same transaction, so the delete
/// succeeds whether or not it was there.
pub fn unguard_script(table: &str, tap: &TapName, guard: PortGuard) -> String {
    let element = format!("{{ \"{tap}\" . {} . {} }}", guard.mac, guard.ip);
    format!(
        "add element {GUARD_FAMILY} {table} {GUARD_SET} {element}\n\
         delete element {GUARD_FAMILY} {table} {GUARD_SET} {element}\n{}",
        reset_policy(table, tap, guard.ip)
    )
}

/// The life an allowed destination gets for a record of `ttl`, within
/// [`EGRESS_MIN_TTL`]..=[`EGRESS_MAX_TTL`].
pub fn egress_timeout(ttl: Duration) -> Duration {
    ttl.clamp(EGRESS_MIN_TTL, EGRESS_MAX_TTL)
}

/// Input for `nft -f -` that lets `guest` reach each of `destinations` for `ttl` (see
/// [`egress_timeout`]). A pair already there gets the new timeout: nft leaves an existing
/// element's timeout alone on `add`, so each is added, deleted and added again.
pub fn allow_script(
    table: &str,
    guest: Ipv4Addr,
    destinations: &[Ipv4Addr],
    ttl: Duration,
) -> String {
    let secs = egress_timeout(ttl).as_secs();
    let mut script = String::new();
    for d in destinations {
        let pair = format!("{guest} . {d}");
        script.push_str(&format!(
            "add element {NFT_FAMILY} {table} {EGRESS_ALLOWED_SET} {{ {pair} }}\n\
             delete element {NFT_FAMILY} {table} {EGRESS_ALLOWED_SET} {{ {pair} }}\n\
             add element {NFT_FAMILY} {table} {EGRESS_ALLOWED_SET} {{ {pair} timeout {secs}s }}\n"
        ));
    }
    script
}

/// The destinations `guest` may reach, from `nft -j list set inet banger egress_allowed`.
/// Anything in the listing that is not a `guest . destination` pair is skipped.
pub fn allowed_destinations(listing: &serde_json::Value, guest: Ipv4Addr) -> Vec<Ipv4Addr> {
    let Some(items) = listing.get("nftables").and_then(|v| v.as_array()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for item in items {
        let Some(elems) = item
            .get("set")
            .and_then(|s| s.get("elem"))
            .and_then(|e| e.as_array())
        else {
            continue;
        };
        for e in elems {
            // With a timeout an element is `{"elem": {"val": {...}, "timeout": ..}}`; without,
            // the value itself.
            let val = e.get("elem").and_then(|x| x.get("val")).unwrap_or(e);
            let Some([g, d]) = val
                .get("concat")
                .and_then(|c| c.as_array())
                .map(Vec::as_slice)
            else {
                continue;
            };
            let parse = |v: &serde_json::Value| v.as_str().and_then(|s| s.parse::<Ipv4Addr>().ok());
            if let (Some(g), Some(d)) = (parse(g), parse(d)) {
                if g == guest {
                    out.push(d);
                }
            }
        }
    }
    out
}

/// Input for `nft -f -` that takes every one of `destinations` away from `guest` (an empty
/// string when there are none).
pub fn forget_script(table: &str, guest: Ipv4Addr, destinations: &[Ipv4Addr]) -> String {
    destinations
        .iter()
        .map(|d| {
            format!(
                "add element {NFT_FAMILY} {table} {EGRESS_ALLOWED_SET} {{ {guest} . {d} }}\n\
                 delete element {NFT_FAMILY} {table} {EGRESS_ALLOWED_SET} {{ {guest} . {d} }}\n"
            )
        })
        .collect()
}

fn normalize(text: &str) -> Vec<String> {
    // nft names interface group 0 after /etc/iproute2/group ("default") where that file says
    // so, and prints the number elsewhere.
    text.replace("iifgroup != \"default\"", "iifgroup != 0")
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// Input for `nft -f -` that removes the tables named `table` (and only them), whichever exist.
pub fn delete_script(table: &str) -> String {
    format!(
        "table {NFT_FAMILY} {table}\ndelete table {NFT_FAMILY} {table}\n\
         table {GUARD_FAMILY} {table}\ndelete table {GUARD_FAMILY} {table}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn default_ruleset() -> NatRuleset {
        NatRuleset::new(
            &BridgeName::default(),
            &Subnet::DEFAULT,
            HostAccess::default(),
        )
    }

    #[test]
    fn default_table_masquerades_the_subnet_and_forwards_via_the_bridge() {
        let expected = "\
table inet banger {
\tcomment \"managed by banger: replaced as a whole, do not edit\"
\tset dns_tcp {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic
\t}

\tset host_open {
\t\ttype ipv4_addr
\t\tcomment \"guests that may reach the host's services (vm create --host-access)\"
\t}

\tset dns_udp {
\t\ttype ipv4_addr
\t\tsize 65535
\t\tflags dynamic,timeout
\t\ttimeout 10s
\t}

\tset egress_filtered {
\t\ttype ipv4_addr
\t\tcomment \"guests whose traffic beyond the host goes only where egress_allowed says\"
\t}

\tset egress_allowed {
\t\ttype ipv4_addr . ipv4_addr
\t\tsize 65535
\t\tflags timeout
\t\tcomment \"guest . destination pairs banger's DNS answered for under an allow-list\"
\t}

\tset sealed {
\t\ttype ipv4_addr
\t\tcomment \"guests with --no-network\"
\t}

\tchain prerouting {
\t\ttype nat hook prerouting priority dstnat; policy accept;
\t\tiifname \"banger0\" ip daddr 172.16.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 172.16.0.1:10053
\t}

\tchain output {
\t\ttype nat hook output priority -100; policy accept;
\t\tip daddr 172.16.0.1 meta l4proto { tcp, udp } th dport 53 dnat ip to 172.16.0.1:10053
\t}

\tchain postrouting {
\t\ttype nat hook postrouting priority srcnat; policy accept;
\t\tip saddr 172.16.0.0/24 oifname != \"banger0\" masquerade
\t}

\tchain input {
\t\ttype filter hook input priority filter; policy accept;
\t\tiifname \"banger0\" ip daddr 172.16.0.1 udp dport 10053 update @dns_udp { ip saddr limit rate over 200/second burst 400 packets } drop
\t\tiifname \"banger0\" ip daddr 172.16.0.1 tcp dport 10053 ct state new add @dns_tcp { ip saddr ct count over 32 } drop
\t\tiifname \"banger0\" ct state established,related accept
\t\tiifname \"banger0\" ip daddr 172.16.0.1 meta l4proto { tcp, udp } th dport 10053 accept
\t\tiifname \"banger0\" ip daddr 169.254.0.0/16 drop
\t\tiifname \"banger0\" ip saddr @host_open accept
\t\tiifname \"banger0\" drop
\t}

\tchain forward {
\t\ttype filter hook forward priority filter; policy accept;
\t\tip saddr @sealed drop
\t\tip daddr @sealed drop
\t\tiifname \"banger0\" ip daddr 169.254.0.0/16 drop
\t\tiifname \"banger0\" oifname != \"banger0\" ip saddr @egress_filtered ct state established,related accept
\t\tiifname \"banger0\" oifname != \"banger0\" ip saddr @egress_filtered ip saddr . ip daddr != @egress_allowed drop
\t\tiifname \"banger0\" oifname != \"banger0\" accept
\t\toifname \"banger0\" ct state established,related accept
\t}
}
";
        assert_eq!(default_ruleset().table(), expected);
    }

    #[test]
    fn custom_bridge_and_subnet_are_used_in_network_form() {
        let r = NatRuleset::new(
            &BridgeName::parse("br9").unwrap(),
            &"10.9.0.1/16".parse().unwrap(),
            HostAccess::DnsOnly,
        );
        assert!(r
            .table()
            .contains("ip saddr 10.9.0.0/16 oifname != \"br9\" masquerade"));
        assert!(r
            .table()
            .contains("iifname \"br9\" oifname != \"br9\" accept"));
        assert!(!r.table().contains("banger0"));
    }

    #[test]
    fn isolation_drops_tap_to_tap_forwarding_only() {
        let open = default_ruleset();
        assert!(!open.guard_table().contains("oifgroup"));
        let group = BridgeOwner::default().group();
        let isolated = NatRuleset::with_policy(
            &BridgeName::default(),
            &Subnet::DEFAULT,
            HostAccess::DnsOnly,
            GuestLinks::Isolated,
            group,
        );
        let t = isolated.guard_table();
        assert!(
            t.ends_with(&format!("\tchain forward {{\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname @sealed drop\n\t\toifname @sealed drop\n\t\tiifgroup {group} oifgroup {group} drop\n\t}}\n}}\n")),
            "{t}"
        );
        assert_eq!(
            isolated
                .table()
                .replace("\t\tiifname \"banger0\" oifname \"banger0\" drop\n", ""),
            open.table(),
            "isolation adds to the inet table only the drop of guest-to-guest routing"
        );
        assert!(isolated.table().contains(
            "\t\tip daddr @sealed drop\n\t\tiifname \"banger0\" oifname \"banger0\" drop\n"
        ));
        assert!(!open.matches_listing(&format!("{}{}", isolated.table(), t)));
    }

    #[test]
    fn an_open_host_keeps_link_local_addresses_closed() {
        let open = NatRuleset::new(&BridgeName::default(), &Subnet::DEFAULT, HostAccess::Open);
        let t = open.table();
        assert!(!t.contains("iifname \"banger0\" drop"), "{t}");
        assert_eq!(t.matches("ip daddr 169.254.0.0/16 drop").count(), 2, "{t}");
        let closed = default_ruleset();
        let t = closed.table();
        // The final drop comes after what stays open.
        let drop_at = t.find("iifname \"banger0\" drop").unwrap();
        assert!(t.find("th dport 10053 accept").unwrap() < drop_at, "{t}");
        assert!(
            t.find("ct state established,related accept").unwrap() < drop_at,
            "{t}"
        );
    }

    #[test]
    fn install_script_replaces_both_tables_in_one_transaction() {
        let script = default_ruleset().install_script();
        assert!(script
            .starts_with("table inet banger\ndelete table inet banger\ntable inet banger {\n"));
        assert!(script.contains(
            "}\ntable bridge banger\ndelete table bridge banger\ntable bridge banger {\n"
        ));
        assert_eq!(script.matches("delete").count(), 2);
        assert_eq!(
            delete_script(NFT_TABLE),
            "table inet banger\ndelete table inet banger\ntable bridge banger\ndelete table bridge banger\n"
        );
    }

    #[test]
    fn the_guard_table_polices_banger_taps_only_and_elements_name_tap_mac_and_address() {
        let r = default_ruleset();
        let t = r.guard_table();
        assert!(t.contains("iifname != \"bg-*\" accept"), "{t}");
        assert!(t.contains("type ifname . ether_addr . ipv4_addr"), "{t}");
        assert!(t.contains("\t\tdrop\n\t}\n"), "{t}");
        let tap = TapName::for_vm("vm1");
        let ip: Ipv4Addr = "172.16.0.2".parse().unwrap();
        let guard = PortGuard::new(Mac::for_ip(ip), ip);
        let script = guard_script(NFT_TABLE, &tap, guard);
        assert!(
            script.ends_with(&format!("\nadd element bridge banger guests {{ \"{tap}\" . 02:ba:ac:10:00:02 . 172.16.0.2 }}\n")),
            "{script}"
        );
        // An earlier policy's membership goes first (added, then deleted: valid either way).
        for set in [
            "inet banger host_open",
            "inet banger egress_filtered",
            "inet banger sealed",
        ] {
            assert!(
                script.contains(&format!(
                    "add element {set} {{ 172.16.0.2 }}\ndelete element {set} {{ 172.16.0.2 }}\n"
                )),
                "{script}"
            );
        }
        assert!(script.contains("delete element bridge banger sealed { \"bg-vm1\" }\n"));
        assert!(
            guard_script(NFT_TABLE, &tap, guard.with_host(HostAccess::Open))
                .ends_with("\nadd element inet banger host_open { 172.16.0.2 }\n")
        );
        assert!(
            guard_script(NFT_TABLE, &tap, guard.with_outbound(Outbound::Filtered))
                .ends_with("\nadd element inet banger egress_filtered { 172.16.0.2 }\n")
        );
        assert!(guard_script(NFT_TABLE, &tap, guard.with_outbound(Outbound::Sealed)).ends_with(
            "\nadd element inet banger sealed { 172.16.0.2 }\nadd element bridge banger sealed { \"bg-vm1\" }\n"
        ));
        let un = unguard_script(NFT_TABLE, &tap, guard);
        assert!(
            un.starts_with("add element bridge banger guests")
                && un.contains("\ndelete element inet banger egress_filtered"),
            "{un}"
        );
        assert!(!un.lines().last().unwrap().starts_with("add"), "{un}");
        // The listing compared is both tables; either one differing is a difference.
        let both = format!("{}{}", r.table(), r.guard_table());
        assert!(r.matches_listing(&both));
        assert!(!r.matches_listing(r.table()));
        assert!(!r.matches_listing(&both.replace("bg-*", "bg*")));
    }

    #[test]
    fn allowed_destinations_are_renewed_and_found_per_guest() {
        let g: Ipv4Addr = "172.16.0.5".parse().unwrap();
        let d: Ipv4Addr = "203.0.113.7".parse().unwrap();
        let script = allow_script(NFT_TABLE, g, &[d], Duration::from_secs(0));
        assert_eq!(
            script,
            "add element inet banger egress_allowed { 172.16.0.5 . 203.0.113.7 }\n\
             delete element inet banger egress_allowed { 172.16.0.5 . 203.0.113.7 }\n\
             add element inet banger egress_allowed { 172.16.0.5 . 203.0.113.7 timeout 30s }\n"
        );
        assert!(
            allow_script(NFT_TABLE, g, &[d], Duration::from_secs(u64::MAX / 4))
                .ends_with("timeout 86400s }\n")
        );
        assert!(allow_script(NFT_TABLE, g, &[d], Duration::from_secs(300))
            .ends_with("timeout 300s }\n"));
        // As `nft -j list set` prints it (nft 1.0.6), with a stranger and junk mixed in.
        let listing: serde_json::Value = serde_json::from_str(
            r#"{"nftables": [{"metainfo": {"version": "1.0.6"}}, {"set": {"family": "inet", "name": "egress_allowed", "table": "banger", "type": ["ipv4_addr", "ipv4_addr"], "flags": ["timeout"], "elem": [{"elem": {"val": {"concat": ["172.16.0.5", "203.0.113.7"]}, "timeout": 90, "expires": 89}}, {"elem": {"val": {"concat": ["172.16.0.6", "203.0.113.8"]}, "timeout": 90, "expires": 89}}, {"concat": ["172.16.0.5", "198.51.100.1"]}, {"elem": {"val": {"concat": ["x", 1]}}}, 7]}}]}"#,
        )
        .unwrap();
        assert_eq!(
            allowed_destinations(&listing, g),
            vec![d, "198.51.100.1".parse::<Ipv4Addr>().unwrap()]
        );
        assert!(allowed_destinations(&serde_json::json!({}), g).is_empty());
        assert_eq!(forget_script(NFT_TABLE, g, &[]), "");
        assert_eq!(
            forget_script(NFT_TABLE, g, &[d]),
            "add element inet banger egress_allowed { 172.16.0.5 . 203.0.113.7 }\n\
             delete element inet banger egress_allowed { 172.16.0.5 . 203.0.113.7 }\n"
        );
    }

    #[test]
    fn each_bridge_has_tables_of_its_own_that_police_its_own_taps() {
        let br9 = BridgeName::parse("br9").unwrap();
        assert_eq!(table_name(&BridgeName::default()), "banger");
        assert_eq!(table_name(&br9), "banger-br9");
        let r = NatRuleset::with_policy(
            &br9,
            &"10.9.0.1/24".parse().unwrap(),
            HostAccess::DnsOnly,
            GuestLinks::Open,
            77,
        );
        assert_eq!(r.name(), "banger-br9");
        assert!(r.table().starts_with("table inet banger-br9 {"));
        assert!(r.guard_table().starts_with("table bridge banger-br9 {"));
        assert!(r
            .install_script()
            .contains("delete table bridge banger-br9\n"));
        assert!(!r.install_script().contains("table inet banger\n"));
        // Another daemon's taps (another group) pass; unknown ones (group 0) are policed.
        assert!(
            r.guard_table()
                .contains("\t\tiifgroup != 77 iifgroup != 0 accept\n"),
            "{}",
            r.guard_table()
        );
        // nft may print group 0 by its name.
        let listed = format!("{}{}", r.table(), r.guard_table())
            .replace("iifgroup != 0", "iifgroup != \"default\"");
        assert!(r.matches_listing(&listed));
        assert_eq!(delete_script("banger-br9"), "table inet banger-br9\ndelete table inet banger-br9\ntable bridge banger-br9\ndelete table bridge banger-br9\n");
    }

    #[test]
    fn listing_comparison_ignores_layout_but_not_content() {
        let r = default_ruleset();
        let listing = format!("{}{}", r.table(), r.guard_table());
        let reindented = listing.replace('\t', "    ").replace("\n\n", "\n");
        assert!(r.matches_listing(&reindented));
        assert!(r.matches_listing(&listing));
        let edited = listing.replace(" masquerade", " accept");
        assert!(!r.matches_listing(&edited));
        let other = NatRuleset::new(
            &BridgeName::default(),
            &"10.0.0.1/24".parse().unwrap(),
            HostAccess::DnsOnly,
        );
        assert!(!r.matches_listing(&format!("{}{}", other.table(), other.guard_table())));
        let open = NatRuleset::new(&BridgeName::default(), &Subnet::DEFAULT, HostAccess::Open);
        assert!(!r.matches_listing(&format!("{}{}", open.table(), open.guard_table())));
        assert!(!r.matches_listing(""));
    }
}
