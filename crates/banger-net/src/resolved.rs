//! Routing the host's `.vm` lookups to banger's DNS server through systemd-resolved.
//!
//! On a resolved host, three per-link settings on the bridge do it: the bridge address as the link's
//! DNS server, `~vm` as a routing-only domain (only `.vm` names go there), and no default route (so
//! no other name is sent to banger). They live on the link, so they vanish with the bridge; banger
//! still reverts them explicitly before tearing the bridge down. Nothing is written to
//! `/etc/resolv.conf` or resolved's config files.
//!
//! resolved is one daemon per host, in the init network namespace, and it identifies links by
//! index. A daemon running in another namespace (as every test does) would hand it the index of its
//! own bridge, which names some unrelated link on the host, so routing is skipped there.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use crate::names::BridgeName;
use crate::privileged::{PrivilegedError, PrivilegedRunner};

/// resolved's varlink socket: present while resolved runs.
pub const RESOLVED_SOCKET: &str = "/run/systemd/resolve/io.systemd.Resolve";

/// Whether banger routes `.vm` through resolved here, and why not when it does not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Routing {
    /// resolved runs and this process shares its network namespace.
    Resolved,
    /// resolved does not run: the user routes `.vm` by hand (docs/dns-routing.md).
    NoResolved,
    /// resolved runs, but this process is in another network namespace.
    OtherNamespace,
}

/// Where `detect` looks; tests point it at a temp dir.
#[derive(Debug, Clone)]
pub struct Probe {
    pub resolved_socket: PathBuf,
    pub own_netns: PathBuf,
    pub init_netns: PathBuf,
}

impl Default for Probe {
    fn default() -> Self {
        Probe {
            resolved_socket: PathBuf::from(RESOLVED_SOCKET),
            own_netns: PathBuf::from("/proc/self/ns/net"),
            init_netns: PathBuf::from("/proc/1/ns/net"),
        }
    }
}

impl Probe {
    pub fn detect(&self) -> Routing {
        if !self.resolved_socket.exists() {
            return Routing::NoResolved;
        }
        // Reading PID 1's namespace link needs privilege; an unprivileged daemon cannot have made
        // a namespace of its own either, so "unreadable" means "the host's".
        match (read_ns(&self.own_netns), read_ns(&self.init_netns)) {
            (Some(own), Some(init)) if own != init => Routing::OtherNamespace,
            _ => Routing::Resolved,
        }
    }
}

fn read_ns(p: &Path) -> Option<PathBuf> {
    std::fs::read_link(p).ok()
}

/// The `resolvectl` calls that route `~vm` to `dns` on `bridge`, in order.
pub fn route_commands(bridge: &BridgeName, dns: Ipv4Addr) -> Vec<Vec<String>> {
    // No default route first and the server last: at no point may resolved send names other
    // than `.vm` to the bridge.
    let br = bridge.as_str();
    [
        ["default-route", br, "false"].map(str::to_owned),
        ["domain", br, "~vm"].map(str::to_owned),
        ["dns".to_owned(), br.to_owned(), dns.to_string()],
    ]
    .into_iter()
    .map(|args| {
        std::iter::once("resolvectl".to_owned())
            .chain(args)
            .collect()
    })
    .collect()
}

/// The call that drops every per-link setting banger made.
pub fn unroute_command(bridge: &BridgeName) -> Vec<String> {
    vec![
        "resolvectl".into(),
        "revert".into(),
        bridge.as_str().to_owned(),
    ]
}

/// Applies `route_commands` through the privileged path; if one fails, reverts what the others
/// did, so the link is never left half-configured.
pub fn route(
    privileged: &PrivilegedRunner,
    bridge: &BridgeName,
    dns: Ipv4Addr,
) -> Result<(), PrivilegedError> {
    for argv in route_commands(bridge, dns) {
        let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
        if let Err(e) = privileged.run("route .vm through systemd-resolved", &argv, None) {
            let _ = unroute(privileged, bridge);
            return Err(e);
        }
    }
    Ok(())
}

/// Applies `unroute_command` through the privileged path.
pub fn unroute(privileged: &PrivilegedRunner, bridge: &BridgeName) -> Result<(), PrivilegedError> {
    let argv = unroute_command(bridge);
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    privileged
        .run("stop routing .vm through systemd-resolved", &argv, None)
        .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_set_server_routing_domain_and_no_default_route() {
        let cmds = route_commands(&BridgeName::default(), Ipv4Addr::new(172, 16, 0, 1));
        let flat: Vec<String> = cmds.iter().map(|c| c.join(" ")).collect();
        assert_eq!(
            flat,
            [
                "resolvectl default-route banger0 false",
                "resolvectl domain banger0 ~vm",
                "resolvectl dns banger0 172.16.0.1",
            ]
        );
        assert_eq!(
            unroute_command(&BridgeName::default()).join(" "),
            "resolvectl revert banger0"
        );
    }

    #[test]
    fn detection_needs_resolved_and_the_init_namespace() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("io.systemd.Resolve");
        let ns_a = dir.path().join("a");
        let ns_b = dir.path().join("b");
        std::os::unix::fs::symlink("net:[4026531840]", &ns_a).unwrap();
        std::os::unix::fs::symlink("net:[4026532999]", &ns_b).unwrap();
        let probe = |own: &Path, init: &Path| Probe {
            resolved_socket: sock.clone(),
            own_netns: own.to_owned(),
            init_netns: init.to_owned(),
        };
        assert_eq!(probe(&ns_a, &ns_a).detect(), Routing::NoResolved);
        std::fs::write(&sock, "").unwrap();
        assert_eq!(probe(&ns_a, &ns_a).detect(), Routing::Resolved);
        assert_eq!(probe(&ns_b, &ns_a).detect(), Routing::OtherNamespace);
        // PID 1's namespace unreadable (unprivileged daemon): the host's.
        assert_eq!(
            probe(&ns_b, &dir.path().join("missing")).detect(),
            Routing::Resolved
        );
    }
}
