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

use crate::addr::{Mac, Subnet};
use crate::names::{BridgeName, TapName, TAP_PREFIX};

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
/// Family of the anti-spoofing table: only the bridge family sees frames between bridge ports.
pub const GUARD_FAMILY: &str = "bridge";
/// The set of (tap, MAC, IPv4 address) each tap may send from.
pub const GUARD_SET: &str = "guests";
/// The set of guest addresses that may reach the host's services (`--host-access`); safe to
/// key by source address because the guard keeps each guest to its own.
pub const HOST_OPEN_SET: &str = "host_open";
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
}

impl PortGuard {
    /// A port that may send from `mac` and `ip`, and reach the host's DNS only.
    pub fn new(mac: Mac, ip: Ipv4Addr) -> Self {
        PortGuard {
            mac,
            ip,
            host: HostAccess::DnsOnly,
        }
    }

    pub fn with_host(self, host: HostAccess) -> Self {
        PortGuard { host, ..self }
    }
}

/// The complete `inet banger` and `bridge banger` tables for one bridge and subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRuleset {
    table: String,
    guard_table: String,
}

impl NatRuleset {
    pub fn new(bridge: &BridgeName, subnet: &Subnet, access: HostAccess) -> Self {
        Self::with_policy(bridge, subnet, access, GuestLinks::Open)
    }

    /// [`NatRuleset::new`], with guests kept apart from each other or not.
    pub fn with_policy(
        bridge: &BridgeName,
        subnet: &Subnet,
        access: HostAccess,
        links: GuestLinks,
    ) -> Self {
        let isolate = match links {
            GuestLinks::Open => String::new(),
            GuestLinks::Isolated => format!(
                "\n\tchain forward {{\n\
                 \t\ttype filter hook forward priority filter; policy accept;\n\
                 \t\tiifname \"{TAP_PREFIX}*\" oifname \"{TAP_PREFIX}*\" drop\n\
                 \t}}\n"
            ),
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
        // Written exactly as nft 1.0 lists it (tabs, blank line between chains), so a correct table
        // compares equal to its listing without any parsing. Names are safe to embed: `BridgeName`
        // only admits [A-Za-z0-9._-].
        let table = format!(
            "table {NFT_FAMILY} {NFT_TABLE} {{\n\
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
             {routed_between_guests}\
             \t\tiifname \"{br}\" ip daddr {LINK_LOCAL_V4} drop\n\
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
            "table {GUARD_FAMILY} {NFT_TABLE} {{\n\
             \tcomment \"managed by banger: replaced as a whole, do not edit\"\n\
             \tset {GUARD_SET} {{\n\
             \t\ttype ifname . ether_addr . ipv4_addr\n\
             \t\tcomment \"each banger tap with the one MAC and IPv4 address its VM may send from\"\n\
             \t}}\n\
             \n\
             \tchain prerouting {{\n\
             \t\ttype filter hook prerouting priority filter; policy accept;\n\
             \t\tiifname != \"{TAP_PREFIX}*\" accept\n\
             \t\tiifname . ether saddr . ip saddr @{GUARD_SET} accept\n\
             \t\tiifname . ether saddr . arp saddr ip @{GUARD_SET} iifname . arp saddr ether . arp saddr ip @{GUARD_SET} accept\n\
             \t\tdrop\n\
             \t}}\n\
             {isolate}\
             }}\n"
        );
        NatRuleset { table, guard_table }
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
            "table {NFT_FAMILY} {NFT_TABLE}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n{}\
             table {GUARD_FAMILY} {NFT_TABLE}\ndelete table {GUARD_FAMILY} {NFT_TABLE}\n{}",
            self.table, self.guard_table
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

/// Input for `nft -f -` that lets `tap` send from `guard`'s addresses, and reach the host if it
/// may (adding is idempotent).
pub fn guard_script(tap: &TapName, guard: PortGuard) -> String {
    let mut script = format!(
        "add element {GUARD_FAMILY} {NFT_TABLE} {GUARD_SET} {{ \"{tap}\" . {} . {} }}\n",
        guard.mac, guard.ip
    );
    if guard.host == HostAccess::Open {
        script.push_str(&format!(
            "add element {NFT_FAMILY} {NFT_TABLE} {HOST_OPEN_SET} {{ {} }}\n",
            guard.ip
        ));
    }
    script
}

/// Input for `nft -f -` that takes `tap`'s addresses (and its host access) out of the sets. Each
/// element is added first, in the same transaction, so the delete succeeds whether or not it
/// was there.
pub fn unguard_script(tap: &TapName, guard: PortGuard) -> String {
    let element = format!("{{ \"{tap}\" . {} . {} }}", guard.mac, guard.ip);
    let host = format!("{{ {} }}", guard.ip);
    format!(
        "add element {GUARD_FAMILY} {NFT_TABLE} {GUARD_SET} {element}\n\
         delete element {GUARD_FAMILY} {NFT_TABLE} {GUARD_SET} {element}\n\
         add element {NFT_FAMILY} {NFT_TABLE} {HOST_OPEN_SET} {host}\n\
         delete element {NFT_FAMILY} {NFT_TABLE} {HOST_OPEN_SET} {host}\n"
    )
}

fn normalize(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// Input for `nft -f -` that removes banger's tables (and only them), whichever exist.
pub fn delete_script() -> String {
    format!(
        "table {NFT_FAMILY} {NFT_TABLE}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n\
         table {GUARD_FAMILY} {NFT_TABLE}\ndelete table {GUARD_FAMILY} {NFT_TABLE}\n"
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
\t\tiifname \"banger0\" ip daddr 169.254.0.0/16 drop
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
        assert!(!open.guard_table().contains("chain forward"));
        let isolated = NatRuleset::with_policy(
            &BridgeName::default(),
            &Subnet::DEFAULT,
            HostAccess::DnsOnly,
            GuestLinks::Isolated,
        );
        let t = isolated.guard_table();
        assert!(
            t.ends_with("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"bg-*\" oifname \"bg-*\" drop\n\t}\n}\n"),
            "{t}"
        );
        assert_eq!(
            isolated
                .table()
                .replace("\t\tiifname \"banger0\" oifname \"banger0\" drop\n", ""),
            open.table(),
            "isolation adds to the inet table only the drop of guest-to-guest routing"
        );
        assert!(isolated.table().contains("\tchain forward {\n\t\ttype filter hook forward priority filter; policy accept;\n\t\tiifname \"banger0\" oifname \"banger0\" drop\n"));
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
            delete_script(),
            "table inet banger\ndelete table inet banger\ntable bridge banger\ndelete table bridge banger\n"
        );
    }

    #[test]
    fn the_guard_table_polices_banger_taps_only_and_elements_name_tap_mac_and_address() {
        let r = default_ruleset();
        let t = r.guard_table();
        assert!(t.contains("iifname != \"bg-*\" accept"), "{t}");
        assert!(t.contains("type ifname . ether_addr . ipv4_addr"), "{t}");
        assert!(t.trim_end().ends_with("drop\n\t}\n}"), "{t}");
        let tap = TapName::for_vm("vm1");
        let ip: Ipv4Addr = "172.16.0.2".parse().unwrap();
        let guard = PortGuard::new(Mac::for_ip(ip), ip);
        assert_eq!(
            guard_script(&tap, guard),
            format!("add element bridge banger guests {{ \"{tap}\" . 02:ba:ac:10:00:02 . 172.16.0.2 }}\n")
        );
        assert!(guard_script(&tap, guard.with_host(HostAccess::Open))
            .ends_with("\nadd element inet banger host_open { 172.16.0.2 }\n"));
        let un = unguard_script(&tap, guard);
        assert!(
            un.starts_with("add element") && un.contains("\ndelete element"),
            "{un}"
        );
        // The listing compared is both tables; either one differing is a difference.
        let both = format!("{}{}", r.table(), r.guard_table());
        assert!(r.matches_listing(&both));
        assert!(!r.matches_listing(r.table()));
        assert!(!r.matches_listing(&both.replace("bg-*", "bg*")));
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
