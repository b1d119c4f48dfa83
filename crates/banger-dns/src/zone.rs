//! The `.vm` zone: which VM names exist and the answer a query for a name gets. Pure data and pure
//! decisions, kept apart from sockets so the rules (NXDOMAIN for unknown names, NODATA for other
//! record types, nothing below a VM name) are unit- and property-tested without a server.
//!
//! The daemon replaces the whole name table whenever its VM list changes; lookups take a read lock
//! for the length of one map lookup, so a burst of queries never waits on a writer for long.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, RwLock};

/// The zone's apex, in presentation form without the trailing dot.
pub const ZONE: &str = "vm";

/// TTL of every record banger serves (and of its negative answers, through the SOA minimum). Short,
/// because a name can move to another VM when one is deleted and another created.
pub const TTL_SECS: u32 = 5;

/// The names the daemon serves: VM name (a DNS label) -> IPv4 address. Cheap to clone; all clones
/// share one table.
#[derive(Debug, Clone, Default)]
pub struct Zone {
    names: Arc<RwLock<BTreeMap<String, Ipv4Addr>>>,
}

/// What the zone says about one question.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The name is outside `.vm`: forward it upstream.
    NotOurs,
    /// `<vm>.vm`, asked for A (or ANY): its address.
    Address(Ipv4Addr),
    /// The apex `vm.` asked for its SOA.
    ApexSoa,
    /// The name exists but has no record of the asked type (AAAA for a VM, say): NOERROR, empty.
    NoData,
    /// Inside `.vm` but no such VM: NXDOMAIN.
    NxDomain,
}

/// The record types the zone tells apart. Everything else counts as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueryKind {
    A,
    Any,
    Soa,
    Other,
}

impl Zone {
    pub fn new() -> Self {
        Self::default()
    }

    /// Replaces the whole table (the daemon's VM list is the source of truth). Names are stored
    /// lower-case, as DNS compares them.
    pub fn replace(&self, entries: impl IntoIterator<Item = (String, Ipv4Addr)>) {
        let fresh: BTreeMap<String, Ipv4Addr> = entries
            .into_iter()
            .map(|(n, ip)| (n.to_ascii_lowercase(), ip))
            .collect();
        *self.names.write().unwrap_or_else(|p| p.into_inner()) = fresh;
    }

    /// The current table, sorted by name.
    pub fn entries(&self) -> Vec<(String, Ipv4Addr)> {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(n, ip)| (n.clone(), *ip))
            .collect()
    }

    fn get(&self, label: &str) -> Option<Ipv4Addr> {
        self.names
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(label)
            .copied()
    }

    /// The answer for `name` (presentation form, any case, with or without the trailing dot).
    pub fn answer(&self, name: &str, kind: QueryKind) -> Answer {
        let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
        if name == ZONE {
            return match kind {
                QueryKind::Soa => Answer::ApexSoa,
                _ => Answer::NoData,
            };
        }
        let Some(label) = name.strip_suffix(".vm") else {
            return Answer::NotOurs;
        };
        // Only one label below the apex exists; `a.web.vm` is not a name banger serves.
        if label.is_empty() || label.contains('.') {
            return Answer::NxDomain;
        }
        match (self.get(label), kind) {
            (None, _) => Answer::NxDomain,
            (Some(ip), QueryKind::A | QueryKind::Any) => Answer::Address(ip),
            (Some(_), _) => Answer::NoData,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn zone() -> Zone {
        let z = Zone::new();
        z.replace([
            ("web".to_owned(), Ipv4Addr::new(172, 16, 0, 2)),
            ("Db-1".to_owned(), Ipv4Addr::new(172, 16, 0, 3)),
        ]);
        z
    }

    #[test]
    fn vm_names_answer_their_address_in_any_case() {
        let z = zone();
        let web = Answer::Address(Ipv4Addr::new(172, 16, 0, 2));
        assert_eq!(z.answer("web.vm.", QueryKind::A), web);
        assert_eq!(z.answer("WEB.Vm", QueryKind::A), web);
        assert_eq!(z.answer("web.vm", QueryKind::Any), web);
        assert_eq!(
            z.answer("db-1.vm.", QueryKind::A),
            Answer::Address(Ipv4Addr::new(172, 16, 0, 3))
        );
    }

    #[test]
    fn unknown_and_deeper_names_in_the_zone_do_not_exist() {
        let z = zone();
        assert_eq!(z.answer("nope.vm.", QueryKind::A), Answer::NxDomain);
        assert_eq!(z.answer("a.web.vm.", QueryKind::A), Answer::NxDomain);
        assert_eq!(z.answer(".vm.", QueryKind::A), Answer::NxDomain);
    }

    #[test]
    fn other_types_on_existing_names_are_empty_not_missing() {
        let z = zone();
        assert_eq!(z.answer("web.vm.", QueryKind::Other), Answer::NoData);
        assert_eq!(z.answer("web.vm.", QueryKind::Soa), Answer::NoData);
        assert_eq!(z.answer("vm.", QueryKind::Soa), Answer::ApexSoa);
        assert_eq!(z.answer("vm.", QueryKind::A), Answer::NoData);
    }

    #[test]
    fn names_outside_the_zone_are_forwarded() {
        let z = zone();
        assert_eq!(z.answer("example.com.", QueryKind::A), Answer::NotOurs);
        assert_eq!(z.answer("web.vmx.", QueryKind::A), Answer::NotOurs);
        assert_eq!(z.answer("vm.example.", QueryKind::A), Answer::NotOurs);
        assert_eq!(z.answer(".", QueryKind::A), Answer::NotOurs);
    }

    #[test]
    fn replace_drops_names_that_are_gone() {
        let z = zone();
        z.replace([("api".to_owned(), Ipv4Addr::new(172, 16, 0, 9))]);
        assert_eq!(z.answer("web.vm", QueryKind::A), Answer::NxDomain);
        assert_eq!(z.entries().len(), 1);
    }

    proptest! {
        #[test]
        fn answer_never_panics_and_outside_names_are_never_ours(name in ".{0,300}") {
            let z = zone();
            let a = z.answer(&name, QueryKind::A);
            let lower = name.to_ascii_lowercase();
            let trimmed = lower.strip_suffix('.').unwrap_or(&lower);
            if trimmed != "vm" && !trimmed.ends_with(".vm") {
                prop_assert_eq!(a, Answer::NotOurs);
            }
        }
    }
}
