//! The nftables ruleset banger owns: one table, `inet banger`, generated here as plain nft syntax.
//!
//! We generate text for `nft -f -` rather than JSON through the `nftables` crate: the text is what a
//! person sees in `nft list table inet banger`, so the same string serves as the install script, the
//! expected listing for the "is it already right?" check, and the snapshot in tests. Installing is a
//! single `nft -f -` transaction that declares, deletes and re-creates the table, so the table is
//! replaced as a whole, atomically, and never half-written. Nothing outside this table is touched.
//!
//! What the table does: masquerade traffic from the guest subnet that leaves through any interface other
//! than the bridge, and accept forwarding bridge -> elsewhere plus the replies coming back. Guests are
//! kept away from the host itself: what arrives from the bridge for a host address is dropped unless
//! it answers a connection the host opened or is DNS for the `.vm` server ([`HostAccess::DnsOnly`],
//! the default; `host_access = true` opens the host, [`HostAccess::Open`]). Link-local addresses
//! (169.254.0.0/16, where clouds serve instance metadata and credentials) are dropped from guests
//! always, whether they are the host's own or lie beyond it. It also
//! sends DNS (port 53, UDP and TCP) addressed to the bridge address, from guests and from the host
//! itself, to the daemon's `.vm` server on `DNS_SERVE_PORT`: the daemon runs as the user and cannot
//! bind port 53, and the rule only matches the bridge address, so no other resolver is affected. It cannot
//! override a `drop` in another table (nftables evaluates every base chain); `doctor` is where such a
//! conflict gets reported, not here.

use crate::addr::Subnet;
use crate::names::BridgeName;

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
/// Name of banger's table.
pub const NFT_TABLE: &str = "banger";
/// Port the daemon's DNS server binds on the bridge address; port 53 there is DNATed to it.
pub const DNS_SERVE_PORT: u16 = 10053;

/// The complete `inet banger` table for one bridge and subnet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatRuleset {
    table: String,
}

impl NatRuleset {
    pub fn new(bridge: &BridgeName, subnet: &Subnet, access: HostAccess) -> Self {
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
             \t\tiifname \"{br}\" ct state established,related accept\n\
             \t\tiifname \"{br}\" ip daddr {gw} meta l4proto {{ tcp, udp }} th dport {DNS_SERVE_PORT} accept\n\
             \t\tiifname \"{br}\" ip daddr {LINK_LOCAL_V4} drop\n\
             {closed_host}\
             \t}}\n\
             \n\
             \tchain forward {{\n\
             \t\ttype filter hook forward priority filter; policy accept;\n\
             \t\tiifname \"{br}\" ip daddr {LINK_LOCAL_V4} drop\n\
             \t\tiifname \"{br}\" oifname != \"{br}\" accept\n\
             \t\toifname \"{br}\" ct state established,related accept\n\
             \t}}\n\
             }}\n",
            net = subnet.network_cidr(),
            gw = subnet.gateway(),
            br = bridge.as_str(),
        );
        NatRuleset { table }
    }

    /// The table definition, as `nft list table inet banger` prints it.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// Input for `nft -f -` that replaces the table in one transaction. Declaring the table first makes
    /// the `delete` valid when the table does not exist yet.
    pub fn install_script(&self) -> String {
        format!(
            "table {NFT_FAMILY} {NFT_TABLE}\ndelete table {NFT_FAMILY} {NFT_TABLE}\n{}",
            self.table
        )
    }

    /// Whether `listing` (the output of `nft list table inet banger`) is this ruleset. Whitespace and
    /// blank lines are ignored; anything else that differs (a rule edited by hand, another subnet, a
    /// different nft formatting) counts as different, and the caller replaces the table, which is
    /// always safe.
    pub fn matches_listing(&self, listing: &str) -> bool {
        normalize(listing) == normalize(&self.table)
    }
}

fn normalize(text: &str) -> Vec<String> {
    text.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .filter(|l| !l.is_empty())
        .collect()
}

/// Input for `nft -f -` that removes banger's table (and only it).
pub fn delete_script() -> String {
    format!("delete table {NFT_FAMILY} {NFT_TABLE}\n")
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
\t\tiifname \"banger0\" ct state established,related accept
\t\tiifname \"banger0\" ip daddr 172.16.0.1 meta l4proto { tcp, udp } th dport 10053 accept
\t\tiifname \"banger0\" ip daddr 169.254.0.0/16 drop
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
    fn install_script_replaces_the_table_in_one_transaction() {
        let script = default_ruleset().install_script();
        assert!(script
            .starts_with("table inet banger\ndelete table inet banger\ntable inet banger {\n"));
        assert_eq!(script.matches("delete").count(), 1);
        assert_eq!(delete_script(), "delete table inet banger\n");
    }

    #[test]
    fn listing_comparison_ignores_layout_but_not_content() {
        let r = default_ruleset();
        let reindented = r.table().replace('\t', "    ").replace("\n\n", "\n");
        assert!(r.matches_listing(&reindented));
        assert!(r.matches_listing(r.table()));
        let edited = r.table().replace(" masquerade", " accept");
        assert!(!r.matches_listing(&edited));
        let other = NatRuleset::new(
            &BridgeName::default(),
            &"10.0.0.1/24".parse().unwrap(),
            HostAccess::DnsOnly,
        );
        assert!(!r.matches_listing(other.table()));
        let open = NatRuleset::new(&BridgeName::default(), &Subnet::DEFAULT, HostAccess::Open);
        assert!(!r.matches_listing(open.table()));
        assert!(!r.matches_listing(""));
    }
}
