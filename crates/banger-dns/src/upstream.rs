//! Where names outside `.vm` go: the host's own resolvers, read from resolv.conf.
//!
//! `/etc/resolv.conf` is what the host itself uses, so it comes first. On systemd-resolved hosts it
//! usually names only the local stub (127.0.0.53); then `/run/systemd/resolve/resolv.conf`, which
//! lists the servers resolved itself asks, is used instead, so that a query never loops back
//! through resolved (which routes `~vm` to banger). The daemon runs on the host, so other loopback
//! resolvers (a local dnsmasq, unbound or Pi-hole) are fine upstreams; only banger's own listening
//! address is dropped, as forwarding to it would loop.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

/// resolv.conf files in the order they are tried.
pub const RESOLV_CONF_CANDIDATES: [&str; 2] =
    ["/etc/resolv.conf", "/run/systemd/resolve/resolv.conf"];

/// systemd-resolved's stub listeners, never used as upstreams (see the module header).
const RESOLVED_STUBS: [[u8; 4]; 2] = [[127, 0, 0, 53], [127, 0, 0, 54]];

/// The `nameserver` lines of a resolv.conf, as port-53 socket addresses, in file order, without
/// duplicates. Lines that do not parse are skipped, as the C resolver does.
pub fn parse_resolv_conf(text: &str) -> Vec<SocketAddr> {
    let mut out: Vec<SocketAddr> = Vec::new();
    for line in text.lines() {
        let line = line.split(['#', ';']).next().unwrap_or("");
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        // IPv6 link-local servers carry a zone (`fe80::1%eth0`), which IpAddr does not parse; they
        // are rare enough upstreams to skip.
        let Some(Ok(ip)) = words.next().map(str::parse::<IpAddr>) else {
            continue;
        };
        let addr = SocketAddr::new(ip, 53);
        if !out.contains(&addr) {
            out.push(addr);
        }
    }
    out
}

/// The host's upstream resolvers: the first candidate file that names at least one usable server,
/// minus `exclude` (banger's own address) and the resolved stub.
pub fn host_upstreams(exclude: IpAddr) -> Vec<SocketAddr> {
    upstreams_from(RESOLV_CONF_CANDIDATES.iter().map(Path::new), exclude)
}

/// `host_upstreams` over explicit files (tests).
pub fn upstreams_from<'a>(
    files: impl IntoIterator<Item = &'a Path>,
    exclude: IpAddr,
) -> Vec<SocketAddr> {
    for file in files {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        let servers: Vec<SocketAddr> = parse_resolv_conf(&text)
            .into_iter()
            .filter(|a| {
                a.ip() != exclude && !RESOLVED_STUBS.iter().any(|s| a.ip() == IpAddr::from(*s))
            })
            .collect();
        if !servers.is_empty() {
            return servers;
        }
    }
    Vec::new()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nameserver_lines_are_read_in_order_without_comments_or_duplicates() {
        let text = "# generated\nsearch lan\nnameserver 192.0.2.1 # primary\n\
                    nameserver   2001:db8::1\n;nameserver 192.0.2.9\nnameserver 192.0.2.1\n\
                    nameserver fe80::1%eth0\nnameserver\noptions edns0\n";
        let got = parse_resolv_conf(text);
        assert_eq!(
            got,
            vec![
                "192.0.2.1:53".parse::<SocketAddr>().unwrap(),
                "[2001:db8::1]:53".parse().unwrap()
            ]
        );
    }

    #[test]
    fn resolved_stub_and_own_address_are_skipped_falling_through_to_the_next_file() {
        let dir = tempfile::tempdir().unwrap();
        let stub = dir.path().join("stub.conf");
        let real = dir.path().join("real.conf");
        std::fs::write(&stub, "nameserver 127.0.0.53\nnameserver 172.16.0.1\n").unwrap();
        std::fs::write(&real, "nameserver 192.0.2.53\n").unwrap();
        let missing = dir.path().join("missing.conf");
        let got = upstreams_from(
            [missing.as_path(), stub.as_path(), real.as_path()],
            "172.16.0.1".parse().unwrap(),
        );
        assert_eq!(got, vec!["192.0.2.53:53".parse::<SocketAddr>().unwrap()]);
    }

    #[test]
    fn a_local_resolver_in_etc_resolv_conf_wins_over_resolved_upstreams() {
        let dir = tempfile::tempdir().unwrap();
        let etc = dir.path().join("etc.conf");
        let resolved = dir.path().join("resolved.conf");
        std::fs::write(&etc, "nameserver 127.0.0.1\n").unwrap();
        std::fs::write(&resolved, "nameserver 192.0.2.53\n").unwrap();
        let got = upstreams_from(
            [etc.as_path(), resolved.as_path()],
            "172.16.0.1".parse().unwrap(),
        );
        assert_eq!(got, vec!["127.0.0.1:53".parse::<SocketAddr>().unwrap()]);
    }
}
