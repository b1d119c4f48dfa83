//! The daemon's egress gate: which names each guest may resolve through banger's DNS, and
//! opening the host's firewall for the addresses an allowed answer gives it.
//!
//! The VM service hands it every VM's policy (its `--allow-host`/`--no-network` combined with
//! the config's `[network] egress`) keyed by the VM's address; the DNS server asks it about
//! every name outside `.vm`. An allowed answer's A records go into the nft set
//! `egress_allowed` for the asking guest (through banger-net's `Network`, which skips pairs it
//! put there recently) before the answer leaves, so the guest's first connection passes. Each
//! refused name is logged once per VM, so a guest that retries in a loop does not fill the log.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use banger_dns::Decision;
use banger_net::{Egress, HostNet, NameVerdict, Network};

/// Refused names remembered for "log once"; past this the set starts over (a guest trying
/// millions of names gets a log line per name per this many, not unbounded memory).
const REFUSALS_REMEMBERED: usize = 4096;

/// One VM's policy, as the gate sees it.
#[derive(Debug, Clone)]
struct Entry {
    vm: String,
    egress: Arc<Egress>,
}

pub struct EgressTable {
    /// The bridge address: the host's own queries come from it and are never filtered.
    host: Ipv4Addr,
    policies: RwLock<HashMap<Ipv4Addr, Entry>>,
    refused: Mutex<HashSet<(Ipv4Addr, String)>>,
    net: Arc<Network<dyn HostNet>>,
}

impl std::fmt::Debug for EgressTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EgressTable")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl EgressTable {
    pub fn new(net: Arc<Network<dyn HostNet>>) -> Self {
        EgressTable {
            host: net.config().subnet.gateway(),
            policies: RwLock::default(),
            refused: Mutex::default(),
            net,
        }
    }

    /// Replaces every VM's policy: (VM name, its address, its policy).
    pub fn replace(&self, entries: Vec<(String, Ipv4Addr, Egress)>) {
        let map = entries
            .into_iter()
            .map(|(vm, ip, egress)| {
                (
                    ip,
                    Entry {
                        vm,
                        egress: Arc::new(egress),
                    },
                )
            })
            .collect();
        *self.policies.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    fn entry(&self, ip: Ipv4Addr) -> Option<Entry> {
        self.policies
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(&ip)
            .cloned()
    }

    /// Logs a refused name, once per VM and name.
    fn log_refusal(&self, ip: Ipv4Addr, vm: &str, name: &str, egress: &Egress) {
        let mut seen = self.refused.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= REFUSALS_REMEMBERED {
            seen.clear();
        }
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        if seen.insert((ip, name.clone())) {
            // The name comes from the guest: escaped by `{:?}`, never raw in the log.
            tracing::info!(vm, "refused {name:?}: the VM's egress is {egress}");
        }
    }
}

#[async_trait::async_trait]
impl banger_dns::EgressGate for EgressTable {
    fn decide(&self, client: IpAddr, name: &str) -> Decision {
        let IpAddr::V4(ip) = client else {
            return Decision::Refuse;
        };
        if ip == self.host {
            return Decision::Forward;
        }
        let Some(entry) = self.entry(ip) else {
            // Every guest's address has an entry before its VM boots; anything else in the
            // subnet is nobody banger knows.
            tracing::debug!(%ip, "refusing a name for an address no VM has");
            return Decision::Refuse;
        };
        match entry.egress.decide(name) {
            NameVerdict::Forward => Decision::Forward,
            NameVerdict::ForwardAndAllow => Decision::ForwardAndAllow,
            NameVerdict::Refuse => {
                self.log_refusal(ip, &entry.vm, name, &entry.egress);
                Decision::Refuse
            }
        }
    }

    async fn allow(
        &self,
        client: IpAddr,
        addrs: Vec<Ipv4Addr>,
        ttl: Duration,
    ) -> Result<(), String> {
        let IpAddr::V4(guest) = client else {
            return Err("not an IPv4 guest".into());
        };
        let net = self.net.clone();
        tokio::task::spawn_blocking(move || net.allow_outbound(guest, &addrs, ttl))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| crate::hints::report(&e).to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use banger_dns::EgressGate;
    use banger_net::{BridgeConfig, FakeHostNet, HostPattern};

    fn table() -> (EgressTable, Arc<Network<FakeHostNet>>) {
        let fake = Arc::new(Network::new(FakeHostNet::new(), BridgeConfig::default()));
        let net: Arc<Network<dyn HostNet>> = fake.clone();
        (EgressTable::new(net), fake)
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(172, 16, 0, last))
    }

    #[tokio::test]
    async fn each_guest_is_decided_by_its_own_policy_and_strangers_are_refused() {
        let (gate, _) = table();
        let allow = Egress::Allow(vec![HostPattern::parse("*.example.org").unwrap()]);
        gate.replace(vec![
            ("open".into(), Ipv4Addr::new(172, 16, 0, 2), Egress::Open),
            ("list".into(), Ipv4Addr::new(172, 16, 0, 3), allow),
            (
                "sealed".into(),
                Ipv4Addr::new(172, 16, 0, 4),
                Egress::Sealed,
            ),
        ]);
        assert_eq!(gate.decide(ip(2), "anything.com"), Decision::Forward);
        assert_eq!(
            gate.decide(ip(3), "www.example.org."),
            Decision::ForwardAndAllow
        );
        assert_eq!(gate.decide(ip(3), "example.org"), Decision::Refuse);
        assert_eq!(gate.decide(ip(4), "www.example.org"), Decision::Refuse);
        assert_eq!(
            gate.decide(ip(9), "anything.com"),
            Decision::Refuse,
            "no VM has .9"
        );
        assert_eq!(
            gate.decide(ip(1), "anything.com"),
            Decision::Forward,
            "the host itself"
        );
        assert_eq!(
            gate.decide("::1".parse().unwrap(), "a.com"),
            Decision::Refuse
        );
        // A restart with another policy: the table is replaced as a whole.
        gate.replace(vec![(
            "list".into(),
            Ipv4Addr::new(172, 16, 0, 3),
            Egress::Open,
        )]);
        assert_eq!(gate.decide(ip(3), "example.org"), Decision::Forward);
        assert_eq!(gate.decide(ip(2), "anything.com"), Decision::Refuse);
    }

    #[tokio::test]
    async fn allowed_answers_reach_the_hosts_set_and_refusals_are_remembered_once() {
        let (gate, net) = table();
        gate.replace(vec![(
            "list".into(),
            Ipv4Addr::new(172, 16, 0, 3),
            Egress::Deny,
        )]);
        for _ in 0..3 {
            assert_eq!(gate.decide(ip(3), "Evil.com."), Decision::Refuse);
        }
        assert_eq!(gate.refused.lock().unwrap().len(), 1);
        let d = Ipv4Addr::new(203, 0, 113, 5);
        gate.allow(ip(3), vec![d], Duration::from_secs(60))
            .await
            .unwrap();
        assert_eq!(
            net.host().state().allowed.keys().collect::<Vec<_>>(),
            vec![&(Ipv4Addr::new(172, 16, 0, 3), d)]
        );
        // Bounded memory: a flood of distinct names does not grow the set past its cap.
        for i in 0..(REFUSALS_REMEMBERED + 10) {
            let _ = gate.decide(ip(3), &format!("n{i}.com"));
        }
        assert!(gate.refused.lock().unwrap().len() <= REFUSALS_REMEMBERED);
    }
}
