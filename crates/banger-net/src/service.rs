//! `Network`: the daemon's network service. It owns the order of host steps (bridge, forwarding, NAT,
//! then the VM's tap), address allocation against the configured subnet, and reconciling taps against the
//! VMs the daemon knows. It does not own the lease records (the daemon's store does) nor which VMs exist.

use std::borrow::Cow;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use banger_hint::Hint;
use nix::unistd::Uid;

use crate::addr::{AllocError, Lease, Subnet, SubnetError};
use crate::egress::Outbound;
use crate::host::{Changes, HostNet, NetError};
use crate::names::{BridgeName, BridgeOwner, NameError, TapName};
use crate::nat::{
    egress_timeout, GuestLinks, HostAccess, NatRuleset, PortGuard, EGRESS_ALLOWED_MAX,
};

/// The configured bridge, subnet, what guests may reach on the host and whether they reach each
/// other (config keys `bridge_name`, `bridge_subnet`, `host_access`, `isolate`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BridgeConfig {
    pub bridge: BridgeName,
    pub subnet: Subnet,
    pub host_access: HostAccess,
    pub guest_links: GuestLinks,
    /// Which daemon the bridge belongs to (marked on it; not a config key).
    pub owner: BridgeOwner,
}

#[derive(Debug, thiserror::Error)]
pub enum BridgeConfigError {
    #[error(transparent)]
    Bridge(#[from] NameError),
    #[error(transparent)]
    Subnet(#[from] SubnetError),
}

impl Hint for BridgeConfigError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        // Transparent: the inner error is not in the chain, so its hint is asked here.
        match self {
            BridgeConfigError::Bridge(e) => e.hint(),
            BridgeConfigError::Subnet(e) => e.hint(),
        }
    }
}

impl BridgeConfig {
    /// Parses the two config values (as written in config.toml).
    pub fn parse(bridge_name: &str, bridge_subnet: &str) -> Result<Self, BridgeConfigError> {
        Ok(BridgeConfig {
            bridge: BridgeName::parse(bridge_name)?,
            subnet: bridge_subnet.parse()?,
            host_access: HostAccess::default(),
            guest_links: GuestLinks::default(),
            owner: BridgeOwner::default(),
        })
    }

    pub fn ruleset(&self) -> NatRuleset {
        NatRuleset::with_policy(
            &self.bridge,
            &self.subnet,
            self.host_access,
            self.guest_links,
            self.owner.group(),
        )
    }
}

/// A VM's tap, ready for the VMM.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttachedTap {
    pub tap: TapName,
    pub changes: Changes,
}

/// What `reconcile` found and did.
#[derive(Debug, Default)]
pub struct ReconcileReport {
    /// banger taps no known VM owns, now deleted.
    pub removed: Vec<TapName>,
    /// banger taps that belong to known VMs, left alone.
    pub kept: Vec<TapName>,
    /// Known taps that do not exist on the host (their VMs need a new tap before they start).
    pub missing: Vec<String>,
    /// Orphans that could not be deleted; the rest were still processed.
    pub failed: Vec<(TapName, NetError)>,
}

/// The network service over some `HostNet`. `H` may be unsized, so the daemon can hold an
/// `Arc<Network<dyn HostNet>>` made from either the real host or a fake (the host comes last
/// for that reason).
#[derive(Debug)]
pub struct Network<H: ?Sized> {
    config: BridgeConfig,
    /// What each attached VM's tap may send from: what the host's guard sets must hold. Kept
    /// here because installing the tables empties those sets (on first use, an upgrade or a
    /// hand edit), and every guard must then go back in at once.
    guards: Mutex<BTreeMap<TapName, PortGuard>>,
    /// When each `guest . destination` pair put into the host's allow set expires, as far as
    /// this daemon knows: a lookup repeated well within a pair's life needs no `nft` call.
    allowed: Mutex<HashMap<(Ipv4Addr, Ipv4Addr), Instant>>,
    host: H,
}

impl<H: HostNet> Network<H> {
    pub fn new(host: H, config: BridgeConfig) -> Self {
        Network {
            config,
            guards: Mutex::default(),
            allowed: Mutex::default(),
            host,
        }
    }
}

impl<H: HostNet + ?Sized> Network<H> {
    pub fn config(&self) -> &BridgeConfig {
        &self.config
    }

    pub fn host(&self) -> &H {
        &self.host
    }

    /// The lowest free guest address given the addresses already leased.
    pub fn allocate(
        &self,
        leased: impl IntoIterator<Item = Ipv4Addr>,
    ) -> Result<Lease, AllocError> {
        self.config.subnet.allocate(leased)
    }

    /// Bridge, forwarding and NAT, in that order (NAT names the bridge; forwarding is useless without
    /// NAT but harmless before it). Idempotent and cheap when everything is already in place.
    pub fn ensure_host(&self) -> Result<Changes, NetError> {
        let mut changes = self
            .host
            .ensure_bridge(&self.config.bridge, &self.config.subnet)?;
        changes.extend(self.host.enable_ip_forwarding()?);
        let nat = self.host.ensure_nat(&self.config.ruleset())?;
        if !nat.is_empty() {
            // The tables were (re)installed with empty sets: put every known guard back, or
            // the VMs already running would be cut off (and lose their host access). Their
            // allowed destinations are gone too; the guests' next lookups bring them back.
            self.allowed().clear();
            let guards = self.guards().clone();
            for (tap, guard) in &guards {
                changes.extend(self.host.guard_port(tap, *guard)?);
            }
        }
        changes.extend(nat);
        if changes.is_empty() {
            tracing::debug!(bridge = %self.config.bridge, "host network already in place");
        } else {
            tracing::info!(bridge = %self.config.bridge, %changes, "host network set up");
        }
        Ok(changes)
    }

    /// Makes sure the host network is in place and the VM's tap exists, owned by `owner` (the user the
    /// VMM runs as), on the bridge and up, and able to send from `guard`'s addresses only. The
    /// guard is in place before the VMM gets the tap, so a guest never sends unguarded.
    pub fn attach_vm(
        &self,
        vm_id: &str,
        owner: Uid,
        guard: PortGuard,
    ) -> Result<AttachedTap, NetError> {
        let mut changes = self.ensure_host()?;
        let tap = TapName::for_vm(vm_id);
        changes.extend(self.host.create_tap(&tap, owner, &self.config.bridge)?);
        changes.extend(self.guard_vm(vm_id, guard)?);
        tracing::info!(vm_id, %tap, %changes, "VM tap ready");
        Ok(AttachedTap { tap, changes })
    }

    /// Lets the VM's tap send from `guard`'s addresses only (and reach the host if it may), and
    /// remembers it, so a reinstall of the tables puts it back. For a VM re-adopted after a
    /// daemon restart, whose tap exists already. Nothing to do when it is known as it is.
    pub fn guard_vm(&self, vm_id: &str, guard: PortGuard) -> Result<Changes, NetError> {
        let tap = TapName::for_vm(vm_id);
        if self.guards().get(&tap) == Some(&guard) {
            return Ok(Changes::none());
        }
        let mut changes = self.host.guard_port(&tap, guard)?;
        self.guards().insert(tap, guard);
        if guard.outbound != Outbound::Open {
            // Pairs left for this address by an earlier VM (or an earlier policy of this
            // one) would let it reach what its own list does not allow.
            changes.extend(self.forget_outbound(guard.ip)?);
        }
        Ok(changes)
    }

    /// Lets `guest` reach `destinations` (the addresses a DNS answer under its allow-list
    /// gave it) for about `ttl`. Pairs this daemon put in place recently enough are not
    /// renewed, so a guest repeating a lookup does not cost an `nft` call each time.
    pub fn allow_outbound(
        &self,
        guest: Ipv4Addr,
        destinations: &[Ipv4Addr],
        ttl: Duration,
    ) -> Result<(), NetError> {
        let timeout = egress_timeout(ttl);
        let now = Instant::now();
        let due: Vec<Ipv4Addr> = {
            let known = self.allowed();
            destinations
                .iter()
                .copied()
                .filter(|d| {
                    // Renewed once less than half of the new life is left.
                    known
                        .get(&(guest, *d))
                        .is_none_or(|exp| *exp < now + timeout / 2)
                })
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect()
        };
        if due.is_empty() {
            return Ok(());
        }
        self.host.allow_outbound(guest, &due, ttl)?;
        let mut known = self.allowed();
        if known.len() + due.len() > EGRESS_ALLOWED_MAX as usize {
            known.retain(|_, exp| *exp > now);
        }
        if known.len() + due.len() <= EGRESS_ALLOWED_MAX as usize {
            for d in due {
                known.insert((guest, d), now + timeout);
            }
        }
        Ok(())
    }

    /// Takes back every destination `guest` was allowed.
    pub fn forget_outbound(&self, guest: Ipv4Addr) -> Result<Changes, NetError> {
        self.allowed().retain(|(g, _), _| *g != guest);
        self.host.forget_outbound(guest)
    }

    fn allowed(&self) -> std::sync::MutexGuard<'_, HashMap<(Ipv4Addr, Ipv4Addr), Instant>> {
        // Only a cache of what the host holds: a poisoned one is still safe to use.
        self.allowed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes the VM's tap if it exists, and takes back what it could send from, even when
    /// the tap would not go: a stale guard would hand its address (and host access) to the
    /// next VM that gets it.
    pub fn detach_vm(&self, vm_id: &str, guard: PortGuard) -> Result<Changes, NetError> {
        let tap = TapName::for_vm(vm_id);
        let deleted = self.host.delete_tap(&tap);
        let known = self.guards().remove(&tap).is_some();
        // Taken back whether or not this daemon knew of it (it may predate a restart); said
        // only when it did, so a second detach reports nothing.
        let unguarded = self.host.unguard_port(&tap, guard)?;
        let mut changes = deleted?;
        if known {
            changes.extend(unguarded);
        }
        if guard.outbound != Outbound::Open {
            changes.extend(self.forget_outbound(guard.ip)?);
        }
        tracing::info!(vm_id, %tap, %changes, "VM tap released");
        Ok(changes)
    }

    fn guards(&self) -> std::sync::MutexGuard<'_, BTreeMap<TapName, PortGuard>> {
        // Every change is one insert or remove: a poisoned map is still consistent.
        self.guards
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Deletes every banger tap not in `known_taps` (the taps of the VMs the daemon has records for).
    /// Non-banger interfaces are never considered. One failed deletion does not stop the others.
    pub fn reconcile(&self, known_taps: &[String]) -> Result<ReconcileReport, NetError> {
        let known: BTreeSet<&str> = known_taps.iter().map(String::as_str).collect();
        let present = self.host.list_taps()?;
        let mut report = ReconcileReport::default();
        for tap in &present {
            if known.contains(tap.as_str()) {
                report.kept.push(tap.clone());
                continue;
            }
            match self.host.delete_tap(tap) {
                Ok(_) => {
                    tracing::info!(%tap, "removed orphaned tap");
                    report.removed.push(tap.clone());
                }
                Err(err) => {
                    tracing::warn!(%tap, error = %err, "could not remove orphaned tap");
                    report.failed.push((tap.clone(), err));
                }
            }
        }
        let present: BTreeSet<&str> = present.iter().map(TapName::as_str).collect();
        report.missing = known
            .into_iter()
            .filter(|k| !present.contains(k))
            .map(str::to_owned)
            .collect();
        Ok(report)
    }

    /// Removes banger's NAT table and bridge.
    pub fn teardown(&self) -> Result<Changes, NetError> {
        let changes = self.host.teardown(&self.config.bridge)?;
        // The sets went with the tables.
        self.guards().clear();
        self.allowed().clear();
        tracing::info!(bridge = %self.config.bridge, %changes, "host network torn down");
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fake::{Call, FakeHostNet};

    fn network() -> Network<FakeHostNet> {
        Network::new(FakeHostNet::new(), BridgeConfig::default())
    }

    fn tap(name: &str) -> TapName {
        TapName::parse(name).unwrap()
    }

    #[test]
    fn ensure_host_sets_up_bridge_then_forwarding_then_nat() {
        let net = network();
        let changes = net.ensure_host().unwrap();
        assert_eq!(changes.as_slice().len(), 3, "{changes}");
        let calls = net.host().calls();
        assert_eq!(
            calls,
            vec![
                Call::EnsureBridge {
                    bridge: BridgeName::default(),
                    subnet: Subnet::DEFAULT
                },
                Call::EnableIpForwarding,
                Call::EnsureNat {
                    table: BridgeConfig::default().ruleset().table().to_owned()
                },
            ]
        );
        let state = net.host().state();
        assert!(state.forwarding);
        assert!(state.bridges.contains_key(&BridgeName::default()));
    }

    #[test]
    fn ensure_host_twice_changes_nothing_the_second_time() {
        let net = network();
        let _ = net.ensure_host().unwrap();
        let before = net.host().state();
        assert!(net.ensure_host().unwrap().is_empty());
        assert_eq!(net.host().state(), before);
    }

    fn guard(last: u8) -> PortGuard {
        let ip = Ipv4Addr::new(172, 16, 0, last);
        PortGuard::new(crate::addr::Mac::for_ip(ip), ip)
    }

    #[test]
    fn attach_vm_ensures_host_first_and_creates_the_derived_tap_guarded() {
        let net = network();
        let attached = net
            .attach_vm("sandbox", Uid::from_raw(1000), guard(2))
            .unwrap();
        assert_eq!(attached.tap.as_str(), "bg-sandbox");
        let calls = net.host().calls();
        assert_eq!(
            calls[calls.len() - 2..],
            [
                Call::CreateTap {
                    tap: tap("bg-sandbox"),
                    owner: 1000,
                    bridge: BridgeName::default()
                },
                // Guarded before anyone can hand the tap to a VMM.
                Call::GuardPort {
                    tap: tap("bg-sandbox")
                },
            ]
        );
        assert!(matches!(calls.first(), Some(Call::EnsureBridge { .. })));
        let state = net.host().state();
        assert_eq!(state.taps[&tap("bg-sandbox")].owner, 1000);
        assert_eq!(state.guards[&tap("bg-sandbox")], guard(2));

        assert!(!net.detach_vm("sandbox", guard(2)).unwrap().is_empty());
        assert!(
            net.detach_vm("sandbox", guard(2)).unwrap().is_empty(),
            "absent tap is fine"
        );
        assert!(net.host().state().taps.is_empty());
        assert!(net.host().state().guards.is_empty());
    }

    #[test]
    fn reinstalled_tables_get_every_running_vms_guard_back() {
        let net = network();
        let open = guard(3).with_host(HostAccess::Open);
        let _ = net.attach_vm("a", Uid::from_raw(1000), guard(2)).unwrap();
        let _ = net.attach_vm("b", Uid::from_raw(1000), open).unwrap();
        net.host().lose_tables();
        assert!(net.host().state().guards.is_empty());
        let changes = net.ensure_host().unwrap();
        assert!(!changes.is_empty());
        let guards = net.host().state().guards;
        assert_eq!(guards.get(&tap("bg-a")), Some(&guard(2)));
        assert_eq!(guards.get(&tap("bg-b")), Some(&open));
    }

    #[test]
    fn a_detach_takes_the_guard_back_even_when_the_tap_will_not_go() {
        let net = network();
        let open = guard(2).with_host(HostAccess::Open);
        let _ = net.attach_vm("a", Uid::from_raw(1000), open).unwrap();
        net.host().fail_deleting(tap("bg-a"));
        assert!(net.detach_vm("a", open).is_err());
        assert!(
            net.host().state().guards.is_empty(),
            "its address and host access outlived it"
        );
        // Re-adopting a VM after a restart guards it again; knowing it already changes nothing.
        assert!(!net.guard_vm("a", open).unwrap().is_empty());
        assert!(net.guard_vm("a", open).unwrap().is_empty());
    }

    #[test]
    fn allowed_destinations_are_cached_renewed_late_and_forgotten_with_the_guest() {
        let net = network();
        let filtered = guard(2).with_outbound(Outbound::Filtered);
        let _ = net.attach_vm("a", Uid::from_raw(1000), filtered).unwrap();
        let d1 = Ipv4Addr::new(203, 0, 113, 1);
        let d2 = Ipv4Addr::new(203, 0, 113, 2);
        let ttl = Duration::from_secs(300);
        net.allow_outbound(filtered.ip, &[d1, d1], ttl).unwrap();
        // The same answer again within its life: no host call.
        net.allow_outbound(filtered.ip, &[d1], ttl).unwrap();
        net.allow_outbound(filtered.ip, &[d1, d2], ttl).unwrap();
        let allows: Vec<_> = net
            .host()
            .calls()
            .into_iter()
            .filter_map(|c| match c {
                Call::AllowOutbound { destinations, .. } => Some(destinations),
                _ => None,
            })
            .collect();
        assert_eq!(allows, vec![vec![d1], vec![d2]]);
        assert_eq!(net.host().state().allowed.len(), 2);
        // A much longer life than the one cached is renewed.
        net.allow_outbound(filtered.ip, &[d1], Duration::from_secs(3600))
            .unwrap();
        assert_eq!(
            net.host().state().allowed[&(filtered.ip, d1)],
            Duration::from_secs(3600)
        );
        assert!(!net.detach_vm("a", filtered).unwrap().is_empty());
        assert!(net.host().state().allowed.is_empty());
        // The next VM with the address starts with nothing allowed, whatever was left.
        net.host().allow_outbound(filtered.ip, &[d2], ttl).unwrap();
        let _ = net.attach_vm("b", Uid::from_raw(1000), filtered).unwrap();
        assert!(net.host().state().allowed.is_empty());
        // An open VM is not looked up for leftovers (one nft call less per start).
        let before = net.host().calls().len();
        let _ = net.attach_vm("c", Uid::from_raw(1000), guard(3)).unwrap();
        assert!(!net.host().calls()[before..]
            .iter()
            .any(|c| matches!(c, Call::ForgetOutbound { .. })));
    }

    #[test]
    fn reconcile_removes_only_unknown_banger_taps() {
        let net = network();
        let a = net
            .attach_vm("a", Uid::from_raw(1000), guard(2))
            .unwrap()
            .tap;
        let b = net
            .attach_vm("b", Uid::from_raw(1000), guard(3))
            .unwrap()
            .tap;
        net.host().add_tap(tap("bg-orphan"), 1000);

        let report = net
            .reconcile(&[a.to_string(), b.to_string(), "bg-gone".to_owned()])
            .unwrap();
        assert_eq!(report.removed, vec![tap("bg-orphan")]);
        assert_eq!(report.kept, vec![a.clone(), b.clone()]);
        assert_eq!(report.missing, vec!["bg-gone".to_owned()]);
        assert!(report.failed.is_empty());
        let left: Vec<_> = net.host().state().taps.into_keys().collect();
        assert_eq!(left, vec![a, b]);
    }

    #[test]
    fn reconcile_reports_failures_and_carries_on() {
        let net = network();
        net.host().add_tap(tap("bg-stuck"), 0);
        net.host().add_tap(tap("bg-zombie"), 0);
        net.host().fail_deleting(tap("bg-stuck"));
        let report = net.reconcile(&[]).unwrap();
        assert_eq!(report.removed, vec![tap("bg-zombie")]);
        assert_eq!(report.failed.len(), 1);
        assert_eq!(report.failed[0].0, tap("bg-stuck"));
        assert!(report.failed[0].1.to_string().contains("delete tap"));
    }

    #[test]
    fn teardown_removes_nat_and_bridge() {
        let net = network();
        let _ = net.ensure_host().unwrap();
        let changes = net.teardown().unwrap();
        assert_eq!(changes.as_slice().len(), 2, "{changes}");
        let state = net.host().state();
        assert!(state.nat.is_none());
        assert!(state.bridges.is_empty());
        assert!(net.teardown().unwrap().is_empty());
    }

    #[test]
    fn config_parse_uses_the_config_keys_in_errors() {
        let cfg = BridgeConfig::parse("br9", "10.9.0.1/24").unwrap();
        assert_eq!(cfg.bridge.as_str(), "br9");
        assert_eq!(cfg.subnet.to_string(), "10.9.0.1/24");
        let err = BridgeConfig::parse("br9", "10.9.0.1").unwrap_err();
        assert!(err.to_string().contains("bridge_subnet"), "{err}");
        let err = BridgeConfig::parse("a-very-long-bridge-name", "10.9.0.1/24").unwrap_err();
        assert!(err.to_string().contains("bridge_name"), "{err}");
    }

    #[test]
    fn allocation_goes_through_the_configured_subnet() {
        let net = Network::new(
            FakeHostNet::new(),
            BridgeConfig::parse("br9", "10.9.0.1/24").unwrap(),
        );
        let lease = net.allocate(["10.9.0.2".parse().unwrap()]).unwrap();
        assert_eq!(lease.ip().to_string(), "10.9.0.3");
        assert_eq!(lease.mac().to_string(), "02:ba:0a:09:00:03");
    }
}
