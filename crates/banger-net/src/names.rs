//! Interface names: `BridgeName` and `TapName`, both checked against the kernel's limits once, at the
//! boundary, so the rest of the crate can pass them to `ip`/`nft` without re-checking or quoting.
//!
//! Every tap banger creates is named `bg-<short>`; that prefix is how `reconcile` recognises banger's
//! own taps among everything else on the host.

use std::borrow::Cow;
use std::fmt;

use banger_hint::Hint;
use sha2::{Digest, Sha256};

/// What every bridge banger creates says in its alias (`ip link set dev BR alias ...`).
pub const BRIDGE_MARK: &str = "managed by banger";

/// Which banger daemon a bridge belongs to: written into the alias of the bridge it creates,
/// so a second daemon on the host (another user, or another state directory) never uses,
/// changes or deletes it. Without an identity (tests, and bridges older bangers made) the alias
/// is the bare mark.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct BridgeOwner(Option<String>);

/// What a bridge's alias says about who owns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ownership {
    /// This daemon's.
    Mine,
    /// A banger bridge without an identity (made before banger marked one): this daemon's to
    /// take, if it carries this daemon's taps.
    Unclaimed,
    /// Another banger daemon's; the text after the mark says whose.
    Other(String),
    /// Not banger's at all.
    Foreign,
}

impl BridgeOwner {
    /// The daemon of user `uid` with its state in `state_dir` (hashed: the alias is public,
    /// and short).
    pub fn new(uid: u32, state_dir: &std::path::Path) -> Self {
        let digest = Sha256::digest(state_dir.as_os_str().as_encoded_bytes());
        BridgeOwner(Some(format!(
            "uid {uid}, state {}",
            hex::encode(&digest[..4])
        )))
    }

    /// The interface group this daemon puts its taps in (1 to 2^31-1, never 0, the
    /// default group). Every daemon's bridge table polices the taps of its own group and those
    /// in group 0 (left by a crash, or made before groups), and leaves the taps of other
    /// daemons' groups to their own tables: nft cannot match the bridge a frame is on here.
    pub fn group(&self) -> u32 {
        let digest = Sha256::digest(self.alias().as_bytes());
        let n = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        1 + n % (i32::MAX as u32 - 1)
    }

    /// The alias banger gives a bridge it creates for this owner.
    pub fn alias(&self) -> String {
        match &self.0 {
            Some(id) => format!("{BRIDGE_MARK} ({id})"),
            None => BRIDGE_MARK.to_owned(),
        }
    }

    /// Whose a bridge with `alias` is, from this owner's point of view.
    pub fn ownership(&self, alias: Option<&str>) -> Ownership {
        let Some(alias) = alias else {
            return Ownership::Foreign;
        };
        if alias == self.alias() {
            return Ownership::Mine;
        }
        if alias == BRIDGE_MARK {
            return Ownership::Unclaimed;
        }
        match alias.strip_prefix(BRIDGE_MARK) {
            Some(rest) => Ownership::Other(
                rest.trim()
                    .trim_start_matches('(')
                    .trim_end_matches(')')
                    .to_owned(),
            ),
            None => Ownership::Foreign,
        }
    }
}

/// Longest interface name the kernel accepts: IFNAMSIZ (16) minus the trailing NUL.
pub const MAX_IFNAME_LEN: usize = 15;

/// Every banger tap starts with this; nothing else of banger's does.
pub const TAP_PREFIX: &str = "bg-";

/// Config key for the bridge name, named in errors.
pub const BRIDGE_CONFIG_KEY: &str = "bridge_name";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("`{BRIDGE_CONFIG_KEY}` = {name:?} is not a usable interface name: {reason}")]
    Bridge { name: String, reason: &'static str },
    #[error("{name:?} is not a banger tap name: {reason}")]
    Tap { name: String, reason: &'static str },
}

impl Hint for NameError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            NameError::Bridge { .. } => Some(
                format!(
                    "use 1 to {MAX_IFNAME_LEN} letters, digits, '-', '_' or '.', e.g. \"banger0\""
                )
                .into(),
            ),
            NameError::Tap { .. } => None,
        }
    }
}

/// Kernel rules (length, no '/', ':' or whitespace, not "." or "..") narrowed to a character set that
/// needs no quoting in a shell, an `ip` argument or an nft string.
fn ifname_problem(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("it is empty")
    } else if name.len() > MAX_IFNAME_LEN {
        Some("it is longer than 15 characters (the kernel's IFNAMSIZ limit)")
    } else if name == "." || name == ".." {
        Some("\".\" and \"..\" are reserved")
    } else if name.starts_with('-') {
        // `ip` and `nft` would read it as an option.
        Some("it must not start with '-'")
    } else if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        Some("only letters, digits, '-', '_' and '.' are allowed")
    } else {
        None
    }
}

/// The host bridge guests' taps attach to (default `banger0`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BridgeName(String);

impl BridgeName {
    pub const DEFAULT: &'static str = "banger0";

    pub fn parse(name: &str) -> Result<Self, NameError> {
        match ifname_problem(name) {
            Some(reason) => Err(NameError::Bridge {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(BridgeName(name.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for BridgeName {
    fn default() -> Self {
        BridgeName(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for BridgeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A banger-owned tap: a valid interface name that starts with [`TAP_PREFIX`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TapName(String);

impl TapName {
    /// Room left for the VM-specific part after the prefix.
    const SHORT_LEN: usize = MAX_IFNAME_LEN - TAP_PREFIX.len();

    /// The tap for a VM. A short lowercase-alphanumeric id is used as is (readable in `ip link`);
    /// anything longer or fancier is hashed, because truncating ids that share a prefix (time-ordered
    /// ids do) would make two VMs fight over one tap.
    pub fn for_vm(vm_id: &str) -> TapName {
        let readable = !vm_id.is_empty()
            && vm_id.len() <= Self::SHORT_LEN
            && vm_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        let short = if readable {
            vm_id.to_owned()
        } else {
            let digest = Sha256::digest(vm_id.as_bytes());
            let mut hex = hex::encode(digest);
            hex.truncate(Self::SHORT_LEN);
            hex
        };
        TapName(format!("{TAP_PREFIX}{short}"))
    }

    /// Accepts a name read back from the host or the store.
    pub fn parse(name: &str) -> Result<Self, NameError> {
        let problem = ifname_problem(name).or_else(|| {
            (!name.starts_with(TAP_PREFIX) || name.len() == TAP_PREFIX.len())
                .then_some("banger taps are named \"bg-<something>\"")
        });
        match problem {
            Some(reason) => Err(NameError::Tap {
                name: name.to_owned(),
                reason,
            }),
            None => Ok(TapName(name.to_owned())),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for TapName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owners_tell_their_bridges_from_other_daemons_and_from_strangers() {
        let me = BridgeOwner::new(1000, std::path::Path::new("/home/me/.local/state/banger"));
        let other = BridgeOwner::new(1000, std::path::Path::new("/srv/other/banger"));
        assert!(
            me.alias()
                .starts_with("managed by banger (uid 1000, state "),
            "{}",
            me.alias()
        );
        assert_ne!(me.alias(), other.alias());
        assert_eq!(me.ownership(Some(&me.alias())), Ownership::Mine);
        assert_eq!(me.ownership(Some(BRIDGE_MARK)), Ownership::Unclaimed);
        assert!(
            matches!(me.ownership(Some(&other.alias())), Ownership::Other(w) if w.starts_with("uid 1000, state "))
        );
        assert_eq!(me.ownership(Some("uplink")), Ownership::Foreign);
        assert_eq!(me.ownership(None), Ownership::Foreign);
        let anonymous = BridgeOwner::default();
        assert_eq!(anonymous.alias(), BRIDGE_MARK);
        assert_eq!(anonymous.ownership(Some(BRIDGE_MARK)), Ownership::Mine);
        assert!(matches!(
            anonymous.ownership(Some(&me.alias())),
            Ownership::Other(_)
        ));
    }

    #[test]
    fn short_ids_stay_readable() {
        assert_eq!(TapName::for_vm("sandbox1").as_str(), "bg-sandbox1");
        assert_eq!(TapName::for_vm("abcdefghijkl").as_str(), "bg-abcdefghijkl");
    }

    #[test]
    fn long_or_unusual_ids_are_hashed_to_fit_ifnamsiz() {
        for id in [
            "01jq8x7k2m3n4p5q6r7s8t9v0w",
            "01jq8x7k2m3n4p5q6r7s8t9v0x",
            "Sandbox",
            "my vm",
            "abcdefghijklm",
        ] {
            let tap = TapName::for_vm(id);
            assert_eq!(tap.as_str().len(), MAX_IFNAME_LEN, "{id}");
            assert!(tap.as_str().starts_with(TAP_PREFIX));
            assert_eq!(TapName::parse(tap.as_str()).unwrap(), tap);
            assert_eq!(TapName::for_vm(id), tap, "deterministic");
        }
        assert_ne!(
            TapName::for_vm("01jq8x7k2m3n4p5q6r7s8t9v0w"),
            TapName::for_vm("01jq8x7k2m3n4p5q6r7s8t9v0x"),
            "ids sharing a long prefix still get distinct taps"
        );
    }

    #[test]
    fn tap_names_must_carry_the_prefix_and_fit() {
        assert!(TapName::parse("bg-x").is_ok());
        for bad in [
            "bg-",
            "tap0",
            "bg-0123456789abc",
            "bg-a/b",
            "bg-a b",
            "bg-a:1",
            "",
        ] {
            assert!(TapName::parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bridge_names_are_checked_and_errors_name_the_key() {
        assert_eq!(BridgeName::default().as_str(), "banger0");
        assert!(BridgeName::parse("br-test.1").is_ok());
        assert!(BridgeName::parse("fifteen-chars-x").is_ok());
        for bad in [
            "",
            "sixteen-chars-xx",
            ".",
            "..",
            "br 0",
            "br\"0",
            "br/0",
            "-rf",
        ] {
            let err = BridgeName::parse(bad).unwrap_err();
            assert!(err.to_string().contains("`bridge_name`"), "{bad:?}");
        }
    }
}
