//! Egress policy: where a guest may send traffic beyond the host (config `[network] egress`, per
//! VM `--allow-host NAME` and `--no-network`). Pure: the names and the decisions.
//!
//! An allow-list is enforced in two places that must agree. banger's DNS server forwards only
//! names the list allows and puts each answer's addresses into the nft set `egress_allowed`
//! (keyed by the guest's address and the destination, expiring with the record's TTL); the nft
//! table drops everything else the guest sends beyond the host, so an address learnt any other
//! way (typed by hand, from another resolver, over DNS-over-TLS) leads nowhere. Keying by the
//! guest's address is safe because the bridge table keeps each guest to its own address.

use std::borrow::Cow;
use std::fmt;

use banger_hint::Hint;
use serde::{Deserialize, Serialize};

/// Most names one allow-list may hold: enough for any real project, and a bound on what each
/// lookup compares against.
pub const MAX_ALLOWED_HOSTS: usize = 1024;

/// One allowed name: `github.com` (that name exactly) or `*.example.org` (any name under it, at
/// any depth, but not `example.org` itself). Stored lowercase, without a trailing dot.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HostPattern {
    /// The name, or for a wildcard the domain under which names match.
    domain: String,
    wildcard: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PatternError {
    #[error("`{0}` is not a host name: {1}")]
    Invalid(String, &'static str),
    #[error("too many allowed hosts ({0}; at most {MAX_ALLOWED_HOSTS})")]
    TooMany(usize),
}

impl Hint for PatternError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            PatternError::Invalid(..) => Some(
                "write a name like \"github.com\", or \"*.example.org\" for every name under example.org"
                    .into(),
            ),
            PatternError::TooMany(_) => Some("allow a parent domain with \"*.\" instead".into()),
        }
    }
}

impl HostPattern {
    pub fn parse(text: &str) -> Result<Self, PatternError> {
        let bad = |why| PatternError::Invalid(text.chars().take(80).collect(), why);
        let (wildcard, rest) = match text.strip_prefix("*.") {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let domain = rest.strip_suffix('.').unwrap_or(rest).to_ascii_lowercase();
        if domain.is_empty() {
            return Err(bad("it is empty"));
        }
        if domain.len() > 253 {
            return Err(bad("it is longer than 253 characters"));
        }
        for label in domain.split('.') {
            if label.is_empty() || label.len() > 63 {
                return Err(bad("each dot-separated part must have 1 to 63 characters"));
            }
            if !label
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            {
                return Err(bad(
                    "only letters, digits, '-' and '_' (and a leading \"*.\") are allowed",
                ));
            }
            if label.starts_with('-') {
                return Err(bad("a part cannot start with '-'"));
            }
        }
        if wildcard && !domain.contains('.') {
            return Err(bad(
                "a wildcard must stand for names under a domain with a dot, like \"*.example.org\"",
            ));
        }
        Ok(HostPattern { domain, wildcard })
    }

    /// Whether `name` (as asked in a query: any case, trailing dot or not) is allowed.
    pub fn matches(&self, name: &str) -> bool {
        let name = name.strip_suffix('.').unwrap_or(name);
        if self.wildcard {
            name.len() > self.domain.len() + 1
                && name.as_bytes()[name.len() - self.domain.len() - 1] == b'.'
                && name[name.len() - self.domain.len()..].eq_ignore_ascii_case(&self.domain)
        } else {
            name.eq_ignore_ascii_case(&self.domain)
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.wildcard {
            f.write_str("*.")?;
        }
        f.write_str(&self.domain)
    }
}

impl Serialize for HostPattern {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for HostPattern {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HostPattern::parse(&text).map_err(serde::de::Error::custom)
    }
}

/// Parses a list of names, refusing an oversized one; duplicates are dropped and the list sorted.
pub fn parse_hosts<S: AsRef<str>>(names: &[S]) -> Result<Vec<HostPattern>, PatternError> {
    if names.len() > MAX_ALLOWED_HOSTS {
        return Err(PatternError::TooMany(names.len()));
    }
    let mut out = names
        .iter()
        .map(|n| HostPattern::parse(n.as_ref()))
        .collect::<Result<Vec<_>, _>>()?;
    out.sort();
    out.dedup();
    Ok(out)
}

/// Where a guest may send traffic beyond the host.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub enum Egress {
    /// Anywhere (the default).
    #[default]
    Open,
    /// Nowhere beyond the host; names outside `.vm` are refused.
    Deny,
    /// Only to the addresses banger's DNS server gave it for these names.
    Allow(Vec<HostPattern>),
    /// `--no-network`: nowhere beyond the host, and no other guest reaches it or is reached.
    /// Names outside `.vm` are refused.
    Sealed,
}

/// What DNS does with a name outside `.vm`, asked by a guest under some [`Egress`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NameVerdict {
    /// Forward it; the guest may go anywhere anyway.
    Forward,
    /// Forward it, and let the guest reach the addresses in the answer.
    ForwardAndAllow,
    /// Answer REFUSED.
    Refuse,
}

impl Egress {
    /// The policy a VM gets: `--no-network` seals it; names given with `--allow-host` make it
    /// an allow-list of those names, plus the config's own list if it has one; otherwise the
    /// config's policy.
    pub fn for_vm(config: &Egress, allow_hosts: &[HostPattern], no_network: bool) -> Egress {
        if no_network {
            return Egress::Sealed;
        }
        if allow_hosts.is_empty() {
            return config.clone();
        }
        let mut list = match config {
            Egress::Allow(l) => l.clone(),
            _ => Vec::new(),
        };
        list.extend(allow_hosts.iter().cloned());
        list.sort();
        list.dedup();
        Egress::Allow(list)
    }

    pub fn decide(&self, name: &str) -> NameVerdict {
        match self {
            Egress::Open => NameVerdict::Forward,
            Egress::Deny | Egress::Sealed => NameVerdict::Refuse,
            Egress::Allow(list) if list.iter().any(|p| p.matches(name)) => {
                NameVerdict::ForwardAndAllow
            }
            Egress::Allow(_) => NameVerdict::Refuse,
        }
    }

    /// What the nft tables must do with the guest's traffic.
    pub fn outbound(&self) -> Outbound {
        match self {
            Egress::Open => Outbound::Open,
            Egress::Deny | Egress::Allow(_) => Outbound::Filtered,
            Egress::Sealed => Outbound::Sealed,
        }
    }

    /// The names of an allow-list (empty otherwise).
    pub fn hosts(&self) -> &[HostPattern] {
        match self {
            Egress::Allow(l) => l,
            _ => &[],
        }
    }

    /// The policy's word: `open`, `deny`, `allow` or `none`.
    pub fn mode(&self) -> &'static str {
        match self {
            Egress::Open => "open",
            Egress::Deny => "deny",
            Egress::Allow(_) => "allow",
            Egress::Sealed => "none",
        }
    }
}

impl fmt::Display for Egress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Egress::Open => f.write_str("open"),
            Egress::Deny => f.write_str("deny (nothing beyond the host)"),
            Egress::Sealed => f.write_str("none (--no-network)"),
            Egress::Allow(list) => {
                f.write_str("only ")?;
                for (i, p) in list.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{p}")?;
                }
                Ok(())
            }
        }
    }
}

/// The nft side of an [`Egress`]: which sets the guest's address (and tap) go into.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Outbound {
    /// Not limited.
    #[default]
    Open,
    /// Only to destinations in `egress_allowed` for this guest.
    Filtered,
    /// Filtered with nothing allowed, and cut off from the other guests.
    Sealed,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> HostPattern {
        HostPattern::parse(s).unwrap()
    }

    #[test]
    fn exact_names_match_themselves_in_any_case_and_with_a_trailing_dot() {
        let gh = p("GitHub.com.");
        assert_eq!(gh.to_string(), "github.com");
        assert!(gh.matches("github.com"));
        assert!(gh.matches("GITHUB.COM."));
        assert!(!gh.matches("api.github.com"));
        assert!(!gh.matches("evilgithub.com"));
        assert!(!gh.matches("github.com.evil.org"));
    }

    #[test]
    fn wildcards_match_names_under_the_domain_only() {
        let w = p("*.example.org");
        assert!(w.matches("a.example.org"));
        assert!(w.matches("a.b.Example.org."));
        assert!(!w.matches("example.org"));
        assert!(!w.matches("badexample.org"));
        assert!(!w.matches(".example.org"));
        assert!(!w.matches("org"));
    }

    #[test]
    fn hostile_or_malformed_names_are_refused() {
        for bad in [
            "",
            "*.",
            "*",
            "*.org",
            "a..b",
            "-a.com",
            "a b.com",
            "a.com/x",
            "a.*.com",
            "\u{1b}[2J.com",
            &"a".repeat(64),
            &format!("{}.com", "a.".repeat(130)),
        ] {
            assert!(HostPattern::parse(bad).is_err(), "{bad:?} was accepted");
        }
        let err = HostPattern::parse("a b").unwrap_err();
        assert!(err.hint().is_some());
        let many: Vec<String> = (0..=MAX_ALLOWED_HOSTS)
            .map(|i| format!("h{i}.com"))
            .collect();
        assert!(matches!(parse_hosts(&many), Err(PatternError::TooMany(_))));
        assert_eq!(
            parse_hosts(&["b.com", "a.com", "B.com"]).unwrap(),
            vec![p("a.com"), p("b.com")]
        );
    }

    #[test]
    fn a_vms_policy_combines_its_flags_with_the_config() {
        let cfg = Egress::Allow(vec![p("a.com")]);
        assert_eq!(Egress::for_vm(&cfg, &[], false), cfg);
        assert_eq!(Egress::for_vm(&cfg, &[p("b.com")], true), Egress::Sealed);
        assert_eq!(
            Egress::for_vm(&cfg, &[p("b.com"), p("a.com")], false),
            Egress::Allow(vec![p("a.com"), p("b.com")])
        );
        // An allow-list on the VM narrows an open config and opens a denying one to its names.
        for config in [Egress::Open, Egress::Deny] {
            assert_eq!(
                Egress::for_vm(&config, &[p("b.com")], false),
                Egress::Allow(vec![p("b.com")])
            );
        }
        assert_eq!(Egress::for_vm(&Egress::Deny, &[], false), Egress::Deny);
    }

    #[test]
    fn decisions_and_the_nft_side_follow_the_policy() {
        let allow = Egress::Allow(vec![p("*.example.org")]);
        assert_eq!(
            allow.decide("www.example.org."),
            NameVerdict::ForwardAndAllow
        );
        assert_eq!(allow.decide("example.org"), NameVerdict::Refuse);
        assert_eq!(Egress::Open.decide("x.com"), NameVerdict::Forward);
        assert_eq!(Egress::Deny.decide("x.com"), NameVerdict::Refuse);
        assert_eq!(Egress::Sealed.decide("x.com"), NameVerdict::Refuse);
        assert_eq!(allow.outbound(), Outbound::Filtered);
        assert_eq!(Egress::Deny.outbound(), Outbound::Filtered);
        assert_eq!(Egress::Sealed.outbound(), Outbound::Sealed);
        assert_eq!(Egress::Open.outbound(), Outbound::Open);
        assert_eq!(allow.to_string(), "only *.example.org");
    }
}
