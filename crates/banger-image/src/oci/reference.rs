//! Image references as people type them (`alpine`, `alpine:3.20`, `ghcr.io/org/tool@sha256:...`),
//! parsed and normalised with Docker's rules (docker/distribution `ParseNormalizedNamed`).
//!
//! - The first path component names a registry only if it contains `.` or `:`, is `localhost`,
//!   or has upper-case letters (which then fail as a repository); otherwise the registry is
//!   `docker.io`, where one-component names live under `library/`. `index.docker.io` is `docker.io`,
//!   and `docker.io` is reached at `registry-1.docker.io`.
//! - Repository components match `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`, the tag
//!   `[\w][\w.-]{0,127}`, and the normalised name (`registry/repository`) is at most 255 bytes.
//! - The tag defaults to `latest` unless a digest is given; with both, the digest decides what is
//!   pulled and the tag is kept for display. Digests are `sha256:<64 lowercase hex>` only.
//!
//! Everything a [`Reference`] holds was validated here, so its parts can go into URLs unescaped.
//! What to connect to (scheme, credentials) is decided by `client` and `auth`.

use crate::digest::Sha256Digest;
use banger_hint::Hint;
use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

/// The registry name short references resolve to.
pub const DOCKER_HUB: &str = "docker.io";
/// Where `docker.io` is actually served.
const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// Docker's other spelling of the Hub.
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const DEFAULT_TAG: &str = "latest";
/// docker/distribution's `NameTotalLengthMax`.
const NAME_MAX: usize = 255;
const TAG_MAX: usize = 128;
/// Longer input cannot be valid (name + tag + digest); refusing it first bounds all other work.
const INPUT_MAX: usize = NAME_MAX + 1 + TAG_MAX + 1 + 71;

/// A normalised image reference: registry, repository, and a tag and/or a digest.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Sha256Digest>,
}

/// Text that is not an image reference.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{input}` is not a valid image reference: {reason}")]
pub struct BadReference {
    /// The input, shortened to at most 100 characters and with control characters escaped.
    pub input: String,
    pub reason: String,
}

impl Hint for BadReference {
    fn hint(&self) -> Option<Cow<'_, str>> {
        Some(
            "write it like alpine:3.20, ghcr.io/org/tool:1 or \
             registry.example:5000/team/base@sha256:<64 hex digits>"
                .into(),
        )
    }
}

impl Reference {
    /// Parses `s` with Docker's normalisation rules (see the module header).
    pub fn parse(s: &str) -> Result<Self, BadReference> {
        let bad = |reason: &str| BadReference {
            input: shorten(s),
            reason: reason.to_owned(),
        };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.len() > INPUT_MAX {
            return Err(bad("it is too long"));
        }
        if s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad(
                "a 64-digit hex string is an image ID, not a name; pull by NAME@sha256:<digest>",
            ));
        }
        let (rest, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest = Sha256Digest::parse_oci(d).map_err(|_| {
                    bad("the part after `@` must be a digest `sha256:` and 64 lowercase hex digits")
                })?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        let last_slash = rest.rfind('/');
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if last_slash.is_none_or(|slash| colon > slash) => {
                (&rest[..colon], Some(&rest[colon + 1..]))
            }
            _ => (rest, None),
        };
        if let Some(tag) = tag {
            check_tag(tag).map_err(|r| bad(&r))?;
        }
        let (registry, remainder) = split_registry(name);
        let registry = if registry == DOCKER_HUB_LEGACY {
            DOCKER_HUB
        } else {
            registry
        };
        if registry != DOCKER_HUB {
            check_registry(registry).map_err(|r| bad(&r))?;
        }
        if remainder.bytes().any(|b| b.is_ascii_uppercase()) {
            return Err(bad(&format!(
                "repository name `{}` must be lowercase",
                shorten(remainder)
            )));
        }
        let repository = if registry == DOCKER_HUB && !remainder.contains('/') {
            format!("library/{remainder}")
        } else {
            remainder.to_owned()
        };
        check_repository(&repository).map_err(|r| bad(&r))?;
        if registry.len() + 1 + repository.len() > NAME_MAX {
            return Err(bad(&format!(
                "the name is longer than {NAME_MAX} characters"
            )));
        }
        let tag = match (tag, digest) {
            (Some(t), _) => Some(t.to_owned()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_owned()),
        };
        Ok(Reference {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry as named (`docker.io`, `ghcr.io`, `127.0.0.1:5000`, `[::1]:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The `host[:port]` to connect to: the registry, except `docker.io` which is served elsewhere.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    /// The repository path (`library/alpine`, `org/tool`).
    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Sha256Digest> {
        self.digest.as_ref()
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// What to ask the registry's manifest endpoint for: the digest if there is one, else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.oci(),
            (None, Some(t)) => t.clone(),
            // parse() always sets one of the two.
            (None, None) => DEFAULT_TAG.to_owned(),
        }
    }

    /// This reference pinned to `digest` (the tag, if any, stays for display).
    pub fn with_digest(&self, digest: Sha256Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl FromStr for Reference {
    type Err = BadReference;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

/// The canonical form: `docker.io/library/alpine:latest`, `host:5000/a/b:t@sha256:...`.
impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{}", d.oci())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Reference({self})")
    }
}

impl serde::Serialize for Reference {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Reference {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Reference::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Docker's `splitDockerDomain`: the first component is a registry only if it looks like a host.
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

/// `host[:port]` where host is DNS-like components or a bracketed IPv6 address.
fn check_registry(registry: &str) -> Result<(), String> {
    let err = || format!("`{}` is not a valid registry host", shorten(registry));
    let (host, port) = if let Some(inner) = registry.strip_prefix('[') {
        let (addr, after) = inner.split_once(']').ok_or_else(err)?;
        if addr.is_empty() || !addr.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err(err());
        }
        let port = match after {
            "" => None,
            p => Some(p.strip_prefix(':').ok_or_else(err)?),
        };
        (None, port)
    } else {
        match registry.split_once(':') {
            Some((h, p)) => (Some(h), Some(p)),
            None => (Some(registry), None),
        }
    };
    if let Some(host) = host {
        let component_ok = |c: &str| {
            let b = c.as_bytes();
            !b.is_empty()
                && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
                && b[0] != b'-'
                && b[b.len() - 1] != b'-'
        };
        if !host.split('.').all(component_ok) {
            return Err(err());
        }
    }
    if let Some(port) = port {
        let ok = !port.is_empty()
            && port.len() <= 5
            && port.bytes().all(|b| b.is_ascii_digit())
            && port.parse::<u32>().is_ok_and(|p| (1..=65535).contains(&p));
        if !ok {
            return Err(format!("`{}` has an invalid port", shorten(registry)));
        }
    }
    Ok(())
}

/// Every `/`-separated component matches `[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*`.
fn check_repository(repo: &str) -> Result<(), String> {
    for component in repo.split('/') {
        if !component_ok(component) {
            return Err(format!(
                "repository component `{}` must be lowercase letters and digits, separated by \
                 `.`, `_`, `__` or dashes",
                shorten(component)
            ));
        }
    }
    Ok(())
}

fn component_ok(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    let mut i = 0;
    loop {
        // A run of [a-z0-9]+ ...
        let start = i;
        while i < b.len() && alnum(b[i]) {
            i += 1;
        }
        if i == start {
            return false;
        }
        if i == b.len() {
            return true;
        }
        // ... then one separator: `.`, `_`, `__`, or any number of `-`.
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if b.get(i) == Some(&b'_') {
                    i += 1;
                }
            }
            b'-' => {
                while b.get(i) == Some(&b'-') {
                    i += 1;
                }
            }
            _ => return false,
        }
    }
}

/// `[\w][\w.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let word = |x: &u8| x.is_ascii_alphanumeric() || *x == b'_';
    let b = tag.as_bytes();
    let ok = !b.is_empty()
        && b.len() <= TAG_MAX
        && word(&b[0])
        && b.iter().all(|x| word(x) || *x == b'.' || *x == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag `{}` must be up to {TAG_MAX} letters, digits, `_`, `.` and `-`, not starting with `.` or `-`",
            shorten(tag)
        ))
    }
}

/// At most 100 characters, control characters escaped: safe to put in a message.
pub(crate) fn shorten(s: &str) -> String {
    let mut out: String = s.chars().take(100).flat_map(char::escape_default).collect();
    if s.chars().nth(100).is_some() {
        out.push_str("...");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    /// input, canonical, registry, repository, tag, has digest
    type Case<'a> = (&'a str, &'a str, &'a str, &'a str, Option<&'a str>, bool);

    #[test]
    fn docker_short_names_normalise() {
        let d = format!("sha256:{HEX}");
        let cases: &[Case] = &[
            // input, canonical, registry, repository, tag, has digest
            (
                "alpine",
                "docker.io/library/alpine:latest",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "alpine:3.20",
                "docker.io/library/alpine:3.20",
                "docker.io",
                "library/alpine",
                Some("3.20"),
                false,
            ),
            (
                "user/repo",
                "docker.io/user/repo:latest",
                "docker.io",
                "user/repo",
                Some("latest"),
                false,
            ),
            (
                "docker.io/alpine",
                "docker.io/library/alpine:latest",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "index.docker.io/library/alpine:1",
                "docker.io/library/alpine:1",
                "docker.io",
                "library/alpine",
                Some("1"),
                false,
            ),
            (
                "index.docker.io/alpine",
                "docker.io/library/alpine:latest",
                "docker.io",
                "library/alpine",
                Some("latest"),
                false,
            ),
            (
                "ghcr.io/org/tool:v1.2",
                "ghcr.io/org/tool:v1.2",
                "ghcr.io",
                "org/tool",
                Some("v1.2"),
                false,
            ),
            (
                "localhost/foo",
                "localhost/foo:latest",
                "localhost",
                "foo",
                Some("latest"),
                false,
            ),
            (
                "localhost:5000/a/b/c",
                "localhost:5000/a/b/c:latest",
                "localhost:5000",
                "a/b/c",
                Some("latest"),
                false,
            ),
            (
                "127.0.0.1:5000/team/base:1",
                "127.0.0.1:5000/team/base:1",
                "127.0.0.1:5000",
                "team/base",
                Some("1"),
                false,
            ),
            (
                "[::1]:5000/x",
                "[::1]:5000/x:latest",
                "[::1]:5000",
                "x",
                Some("latest"),
                false,
            ),
            (
                "[::1]/x",
                "[::1]/x:latest",
                "[::1]",
                "x",
                Some("latest"),
                false,
            ),
            (
                "Registry.Example/x",
                "Registry.Example/x:latest",
                "Registry.Example",
                "x",
                Some("latest"),
                false,
            ),
            // One component that looks like host:port is a name with a tag, as in Docker.
            (
                "localhost:5000",
                "docker.io/library/localhost:5000",
                "docker.io",
                "library/localhost",
                Some("5000"),
                false,
            ),
            (
                "a__b/c--d/e.f_g",
                "docker.io/a__b/c--d/e.f_g:latest",
                "docker.io",
                "a__b/c--d/e.f_g",
                Some("latest"),
                false,
            ),
            (
                "alpine:_x",
                "docker.io/library/alpine:_x",
                "docker.io",
                "library/alpine",
                Some("_x"),
                false,
            ),
        ];
        for (input, canonical, registry, repository, tag, digest) in cases {
            let r = Reference::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.to_string(), *canonical, "{input}");
            assert_eq!(r.registry(), *registry, "{input}");
            assert_eq!(r.repository(), *repository, "{input}");
            assert_eq!(r.tag(), *tag, "{input}");
            assert_eq!(r.digest().is_some(), *digest, "{input}");
            // The canonical form parses back to the same reference.
            assert_eq!(Reference::parse(canonical).unwrap(), r, "{input}");
        }
        let r = Reference::parse(&format!("alpine@{d}")).unwrap();
        assert_eq!(r.tag(), None, "no default tag with a digest");
        assert_eq!(r.to_string(), format!("docker.io/library/alpine@{d}"));
        assert_eq!(r.manifest_reference(), d);
        let r = Reference::parse(&format!("ghcr.io/org/tool:1@{d}")).unwrap();
        assert_eq!(r.tag(), Some("1"));
        assert_eq!(r.manifest_reference(), d, "the digest wins over the tag");
        assert_eq!(r.to_string(), format!("ghcr.io/org/tool:1@{d}"));
        let r = Reference::parse("localhost:5000/a:t").unwrap();
        assert_eq!(r.manifest_reference(), "t");
        assert_eq!(r.name(), "localhost:5000/a");
    }

    #[test]
    fn docker_hub_is_reached_at_its_api_host() {
        assert_eq!(
            Reference::parse("alpine").unwrap().api_host(),
            "registry-1.docker.io"
        );
        assert_eq!(
            Reference::parse("docker.io/x/y").unwrap().api_host(),
            "registry-1.docker.io"
        );
        assert_eq!(
            Reference::parse("127.0.0.1:5000/x").unwrap().api_host(),
            "127.0.0.1:5000"
        );
    }

    #[test]
    fn hostile_and_malformed_references_are_refused() {
        let long_component = "a".repeat(250);
        let long_tag = format!("alpine:{}", "t".repeat(129));
        let max_tag = format!("alpine:{}", "t".repeat(128));
        assert!(Reference::parse(&max_tag).is_ok());
        let cases: Vec<(String, &str)> = vec![
            ("".into(), "empty"),
            (HEX.into(), "image ID"),
            ("../etc/passwd".into(), "not a valid registry host"),
            ("a/../b".into(), "repository component"),
            ("a/./b".into(), "repository component"),
            ("a//b".into(), "repository component"),
            ("a/".into(), "repository component"),
            ("/a".into(), "repository component"),
            ("Alpine".into(), "lowercase"),
            ("ghcr.io/Org/x".into(), "lowercase"),
            ("a___b".into(), "repository component"),
            ("a.-b".into(), "repository component"),
            ("-a".into(), "repository component"),
            ("a-".into(), "repository component"),
            ("a b".into(), "repository component"),
            ("a\nb".into(), "repository component"),
            ("a\0b".into(), "repository component"),
            ("ａlpine".into(), "repository component"),
            ("alpine:".into(), "tag"),
            ("alpine:-x".into(), "tag"),
            ("alpine:.x".into(), "tag"),
            ("alpine:a/b".into(), "invalid port"),
            (long_tag, "tag"),
            ("alpine@".into(), "digest"),
            ("alpine@sha256:../x".into(), "digest"),
            (format!("alpine@sha512:{HEX}{HEX}"), "digest"),
            (format!("alpine@sha256:{}", HEX.to_uppercase()), "digest"),
            (format!("alpine@sha256:{HEX}@sha256:{HEX}"), "digest"),
            ("host:99999/a".into(), "invalid port"),
            ("host:0/a".into(), "invalid port"),
            ("host:/a".into(), "invalid port"),
            ("host:5000:1/a".into(), "invalid port"),
            ("-host.x/a".into(), "not a valid registry host"),
            ("host..x/a".into(), "not a valid registry host"),
            ("[zz]:5000/a".into(), "not a valid registry host"),
            ("[::1/a".into(), "not a valid registry host"),
            ("[::1]x/a".into(), "not a valid registry host"),
            ("us\u{e9}r.io/a".into(), "not a valid registry host"),
            (format!("r.io/{long_component}/b"), "longer than 255"),
            ("a".repeat(10_000), "too long"),
        ];
        let mut wrong = Vec::new();
        for (input, want) in cases {
            let err = match Reference::parse(&input) {
                Ok(r) => {
                    wrong.push(format!("{input:?} parsed as {r}"));
                    continue;
                }
                Err(e) => e,
            };
            let msg = err.to_string();
            if !msg.contains(want) {
                wrong.push(format!("{input:?}: {msg}"));
            }
            assert!(err.hint().is_some(), "{msg}");
            assert!(!msg.contains('\n'), "one line: {msg}");
            assert!(err.input.chars().count() <= 103, "input shortened: {msg}");
            assert!(
                !err.input.contains('\n') && !err.input.contains('\0'),
                "{msg}"
            );
        }
    }

    #[test]
    fn serde_uses_the_canonical_string() {
        let r = Reference::parse("alpine:3.20").unwrap();
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"docker.io/library/alpine:3.20\"");
        assert_eq!(serde_json::from_str::<Reference>(&json).unwrap(), r);
        assert!(serde_json::from_str::<Reference>("\"../x\"").is_err());
    }

    #[test]
    fn with_digest_pins_and_keeps_the_tag() {
        let d = Sha256Digest::of_bytes(b"m");
        let r = Reference::parse("alpine:3.20").unwrap().with_digest(d);
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/alpine:3.20@{}", d.oci())
        );
    }
}
