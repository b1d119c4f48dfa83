//! The SHA-256 digest type used for bundle files, manifests and recipe cache keys.
//!
//! Digests are parsed once at the boundary (manifest, catalog, config) into [`Sha256Digest`], so
//! comparisons inside the crate never depend on letter case or stray whitespace. OCI documents
//! write digests as `sha256:<64 lowercase hex>` ([`Sha256Digest::parse_oci`], [`Sha256Digest::oci`]);
//! other algorithms are refused, and a digest becomes a file name only after it parsed.
//! [`Sha256Digest::of_file`] hashes a file (downloads resuming a part use the same reader).

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};
use std::fmt;
use std::io::Read;
use std::path::Path;
use std::str::FromStr;

/// A SHA-256 digest; displays and serialises as 64 lowercase hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Sha256Digest([u8; 32]);

#[derive(Debug, thiserror::Error)]
#[error("`{value}` is not a SHA-256 digest (expected 64 hex digits)")]
pub struct BadDigest {
    pub value: String,
}

/// An OCI digest string that banger cannot use: not `sha256:` followed by 64 lowercase hex digits.
#[derive(Debug, thiserror::Error)]
#[error("`{value}` is not a sha256 digest (expected `sha256:` and 64 lowercase hex digits)")]
pub struct BadOciDigest {
    /// The offending text, shortened to at most 100 characters.
    pub value: String,
}

impl Sha256Digest {
    /// Parses an OCI digest, `sha256:<64 lowercase hex>`; anything else (another algorithm,
    /// upper case, `sha256:../x`) is refused, as the OCI spec makes sha256 hex lowercase.
    pub fn parse_oci(s: &str) -> Result<Self, BadOciDigest> {
        let bad = || BadOciDigest {
            value: s.chars().take(100).collect(),
        };
        let hex = s.strip_prefix("sha256:").ok_or_else(bad)?;
        if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(bad());
        }
        hex.parse().map_err(|_| bad())
    }

    /// The OCI form, `sha256:<hex>`.
    pub fn oci(&self) -> String {
        format!("sha256:{self}")
    }

    pub fn of_bytes(data: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(data))
    }

    /// The digest of the file at `path`, read in 256 KiB chunks (blocking I/O).
    pub fn of_file(path: &Path) -> std::io::Result<Self> {
        hash_file(path).map(|(h, _)| Self::from_hasher(h))
    }

    pub(crate) fn from_hasher(h: Sha256) -> Self {
        Self(h.finalize().into())
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

/// Hashes the file at `path`; returns the hasher (to go on with, as a resumed download does)
/// and the number of bytes read. Blocking I/O.
pub(crate) fn hash_file(path: &Path) -> std::io::Result<(Sha256, u64)> {
    let mut file = fs_err::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        let n = match file.read(&mut buf) {
            Ok(0) => return Ok((hasher, total)),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        hasher.update(&buf[..n]);
        total += n as u64;
    }
}

impl FromStr for Sha256Digest {
    type Err = BadDigest;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || BadDigest {
            value: s.to_owned(),
        };
        if s.len() != 64 {
            return Err(bad());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| bad())?;
        Ok(Self(out))
    }
}

impl fmt::Display for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for Sha256Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{self}")
    }
}

impl Serialize for Sha256Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Sha256Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn digest_of_empty_input_is_the_well_known_value() {
        assert_eq!(Sha256Digest::of_bytes(b"").to_string(), EMPTY);
    }

    #[test]
    fn parsing_accepts_either_case_and_prints_lowercase() {
        let d: Sha256Digest = EMPTY.to_uppercase().parse().unwrap();
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(format!("{d:?}"), format!("sha256:{EMPTY}"));
    }

    #[test]
    fn parsing_rejects_wrong_length_and_non_hex() {
        for bad in ["", "abc", &EMPTY[1..], &format!("{}zz", &EMPTY[2..])] {
            let err = bad.parse::<Sha256Digest>().unwrap_err();
            assert!(err.to_string().contains("64 hex digits"), "{err}");
        }
    }

    #[test]
    fn oci_digests_are_sha256_lowercase_only() {
        let d = Sha256Digest::parse_oci(&format!("sha256:{EMPTY}")).unwrap();
        assert_eq!(d.oci(), format!("sha256:{EMPTY}"));
        let long = "sha256:".to_string() + &"a".repeat(10_000);
        for bad in [
            EMPTY.to_string(),
            format!("sha256:{}", EMPTY.to_uppercase()),
            format!("sha512:{EMPTY}"),
            format!("SHA256:{EMPTY}"),
            "sha256:../x".to_string(),
            format!("sha256:{}/..", &EMPTY[..61]),
            format!("sha256:{EMPTY} "),
            format!(" sha256:{EMPTY}"),
            long,
        ] {
            let err = Sha256Digest::parse_oci(&bad).unwrap_err();
            assert!(err.value.len() <= 100, "{err}");
            assert!(err.to_string().contains("64 lowercase hex"), "{err}");
        }
    }

    #[test]
    fn of_file_hashes_the_whole_file_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let data: Vec<u8> = (0..700_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &data).unwrap();
        assert_eq!(
            Sha256Digest::of_file(&path).unwrap(),
            Sha256Digest::of_bytes(&data)
        );
        let (_, n) = hash_file(&path).unwrap();
        assert_eq!(n, data.len() as u64);
        let err = Sha256Digest::of_file(&dir.path().join("missing")).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }

    #[test]
    fn serde_round_trips_as_a_hex_string() {
        let d = Sha256Digest::of_bytes(b"x");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        let back: Sha256Digest = serde_json::from_str(&json).unwrap();
        assert_eq!(back, d);
        assert!(serde_json::from_str::<Sha256Digest>("\"nothex\"").is_err());
    }
}
