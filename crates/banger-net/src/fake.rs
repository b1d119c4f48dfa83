//! `FakeHostNet`: a recording, in-memory `HostNet` for unprivileged tests of the logic that drives it
//! (this crate's `Network`, and the daemon's VM lifecycle).
//!
//! It models the same idempotence as the real host (a second `ensure_*` reports no changes) and can be told
//! to fail creating taps or deleting a given tap, so error paths are testable too.

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use nix::unistd::Uid;

use crate::addr::Subnet;
use crate::host::{Changes, HostNet, NetError};
use crate::names::{BridgeName, TapName};
use crate::nat::{NatRuleset, PortGuard};
use crate::privileged::PrivilegedError;

/// One `HostNet` call, as recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Call {
    EnsureBridge {
        bridge: BridgeName,
        subnet: Subnet,
    },
    EnableIpForwarding,
    EnsureNat {
        table: String,
    },
    CreateTap {
        tap: TapName,
        owner: u32,
        bridge: BridgeName,
    },
    DeleteTap {
        tap: TapName,
    },
    GuardPort {
        tap: TapName,
    },
    UnguardPort {
        tap: TapName,
    },
    AllowOutbound {
        guest: Ipv4Addr,
        destinations: Vec<Ipv4Addr>,
    },
    ForgetOutbound {
        guest: Ipv4Addr,
    },
    ListTaps,
    Teardown {
        bridge: BridgeName,
    },
}

/// A tap in the fake host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeTap {
    pub owner: u32,
    pub bridge: Option<BridgeName>,
}

/// The fake host's network state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FakeState {
    pub bridges: BTreeMap<BridgeName, Subnet>,
    pub forwarding: bool,
    pub nat: Option<NatRuleset>,
    pub taps: BTreeMap<TapName, FakeTap>,
    /// What each guarded tap may send from.
    pub guards: BTreeMap<TapName, PortGuard>,
    /// `guest . destination` pairs an allow-list let through, with their timeout.
    pub allowed: BTreeMap<(Ipv4Addr, Ipv4Addr), Duration>,
}

#[derive(Debug, Default)]
struct Inner {
    state: FakeState,
    calls: Vec<Call>,
    failing_deletes: BTreeSet<TapName>,
    failing_creates: bool,
}

#[derive(Debug, Default)]
pub struct FakeHostNet {
    inner: Mutex<Inner>,
}

impl FakeHostNet {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind, still fine to inspect.
        self.inner
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub fn calls(&self) -> Vec<Call> {
        self.lock().calls.clone()
    }

    pub fn state(&self) -> FakeState {
        self.lock().state.clone()
    }

    /// Puts a tap on the fake host without recording a call, e.g. one left behind by a crash.
    pub fn add_tap(&self, tap: TapName, owner: u32) {
        self.lock().state.taps.insert(
            tap,
            FakeTap {
                owner,
                bridge: None,
            },
        );
    }

    /// Makes every later `create_tap` fail (while `yes`), as on a host without the privileges.
    pub fn fail_creating_taps(&self, yes: bool) {
        self.lock().failing_creates = yes;
    }

    /// Makes every later `delete_tap(tap)` fail.
    pub fn fail_deleting(&self, tap: TapName) {
        self.lock().failing_deletes.insert(tap);
    }

    /// The nft tables go behind banger's back (an upgrade, a hand edit, `nft flush ruleset`):
    /// the next `ensure_nat` installs them again, with empty sets.
    pub fn lose_tables(&self) {
        let mut inner = self.lock();
        inner.state.nat = None;
        inner.state.guards.clear();
        inner.state.allowed.clear();
    }
}

/// A failure the test asked for, shaped like the real runner's.
fn injected(op: &'static str, command: String) -> NetError {
    NetError::Privileged(PrivilegedError::Failed {
        op,
        command,
        status: "exit status: 2".to_owned(),
        stderr: "injected failure (FakeHostNet)".to_owned(),
        hint: "none: this is a test double".to_owned(),
    })
}

impl HostNet for FakeHostNet {
    fn ensure_bridge(&self, bridge: &BridgeName, subnet: &Subnet) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::EnsureBridge {
            bridge: bridge.clone(),
            subnet: *subnet,
        });
        let mut changes = Changes::none();
        if inner.state.bridges.get(bridge) != Some(subnet) {
            inner.state.bridges.insert(bridge.clone(), *subnet);
            changes.push(format!("created bridge {bridge} with {subnet}"));
        }
        Ok(changes)
    }

    fn enable_ip_forwarding(&self) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::EnableIpForwarding);
        let mut changes = Changes::none();
        if !inner.state.forwarding {
            inner.state.forwarding = true;
            changes.push("enabled IPv4 forwarding");
        }
        Ok(changes)
    }

    fn ensure_nat(&self, ruleset: &NatRuleset) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::EnsureNat {
            table: ruleset.table().to_owned(),
        });
        let mut changes = Changes::none();
        if inner.state.nat.as_ref() != Some(ruleset) {
            inner.state.nat = Some(ruleset.clone());
            // As on a real host: installing the tables empties their sets.
            inner.state.guards.clear();
            inner.state.allowed.clear();
            changes.push("installed nft table inet banger");
        }
        Ok(changes)
    }

    fn create_tap(
        &self,
        tap: &TapName,
        owner: Uid,
        bridge: &BridgeName,
    ) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::CreateTap {
            tap: tap.clone(),
            owner: owner.as_raw(),
            bridge: bridge.clone(),
        });
        if inner.failing_creates {
            return Err(injected(
                "create tap",
                format!("ip tuntap add dev {tap} mode tap"),
            ));
        }
        let wanted = FakeTap {
            owner: owner.as_raw(),
            bridge: Some(bridge.clone()),
        };
        let mut changes = Changes::none();
        if inner.state.taps.get(tap) != Some(&wanted) {
            inner.state.taps.insert(tap.clone(), wanted);
            changes.push(format!("created tap {tap} on {bridge}"));
        }
        Ok(changes)
    }

    fn delete_tap(&self, tap: &TapName) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::DeleteTap { tap: tap.clone() });
        if inner.failing_deletes.contains(tap) {
            return Err(injected("delete tap", format!("ip link del dev {tap}")));
        }
        let mut changes = Changes::none();
        if inner.state.taps.remove(tap).is_some() {
            changes.push(format!("deleted tap {tap}"));
        }
        Ok(changes)
    }

    fn guard_port(&self, tap: &TapName, guard: PortGuard) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::GuardPort { tap: tap.clone() });
        let mut changes = Changes::none();
        if inner.state.guards.insert(tap.clone(), guard) != Some(guard) {
            changes.push(format!(
                "{tap} may send from {} {} only",
                guard.mac, guard.ip
            ));
        }
        Ok(changes)
    }

    fn unguard_port(&self, tap: &TapName, _guard: PortGuard) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::UnguardPort { tap: tap.clone() });
        let mut changes = Changes::none();
        if inner.state.guards.remove(tap).is_some() {
            changes.push(format!("{tap} is no longer guarded"));
        }
        Ok(changes)
    }

    fn allow_outbound(
        &self,
        guest: Ipv4Addr,
        destinations: &[Ipv4Addr],
        ttl: Duration,
    ) -> Result<(), NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::AllowOutbound {
            guest,
            destinations: destinations.to_vec(),
        });
        let timeout = crate::nat::egress_timeout(ttl);
        for d in destinations {
            inner.state.allowed.insert((guest, *d), timeout);
        }
        Ok(())
    }

    fn forget_outbound(&self, guest: Ipv4Addr) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::ForgetOutbound { guest });
        let before = inner.state.allowed.len();
        inner.state.allowed.retain(|(g, _), _| *g != guest);
        let mut changes = Changes::none();
        if inner.state.allowed.len() != before {
            changes.push(format!(
                "{guest} may no longer reach what its DNS answers allowed"
            ));
        }
        Ok(changes)
    }

    fn list_taps(&self) -> Result<Vec<TapName>, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::ListTaps);
        Ok(inner.state.taps.keys().cloned().collect())
    }

    fn teardown(&self, bridge: &BridgeName) -> Result<Changes, NetError> {
        let mut inner = self.lock();
        inner.calls.push(Call::Teardown {
            bridge: bridge.clone(),
        });
        let mut changes = Changes::none();
        if inner.state.nat.take().is_some() {
            changes.push("deleted nft table inet banger");
        }
        // The sets went with the table.
        inner.state.guards.clear();
        inner.state.allowed.clear();
        if inner.state.bridges.remove(bridge).is_some() {
            changes.push(format!("deleted bridge {bridge}"));
        }
        for tap in inner.state.taps.values_mut() {
            if tap.bridge.as_ref() == Some(bridge) {
                tap.bridge = None;
            }
        }
        Ok(changes)
    }
}
