//! The root of apt's trust chain: a suite's `InRelease` file, checked with `gpgv` against
//! Debian's archive keyring, and the digests of the package indexes it lists.
//!
//! Only the text `gpgv` says is signed is parsed (`--output -`), never the file around it, and
//! the file itself must be one clear-signed message and nothing else (apt's rule: text before
//! or after the signed part, or a second signed part, is how a signature gets smuggled past a
//! parser). The suite must name itself as the one asked for, so a mirror cannot answer
//! `bookworm` with another suite's correctly signed index.

use std::path::Path;
use std::process::Command;

use crate::digest::Sha256Digest;

const BEGIN_SIGNED: &str = "-----BEGIN PGP SIGNED MESSAGE-----";
const BEGIN_SIGNATURE: &str = "-----BEGIN PGP SIGNATURE-----";
const END_SIGNATURE: &str = "-----END PGP SIGNATURE-----";

/// The most an `InRelease` file may weigh (Debian's are about 150 KiB).
pub const MAX_INRELEASE: u64 = 1 << 20;

/// One index the release file lists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexFile {
    pub sha256: Sha256Digest,
    pub size: u64,
}

/// The parts of a verified release file banger uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    /// Whether indexes may be fetched by digest (`by-hash/SHA256/<hex>`), which never races
    /// with a mirror update the way the plain file name can.
    pub acquire_by_hash: bool,
    entries: Vec<(String, IndexFile)>,
}

impl Release {
    /// The index at `path` (relative to the suite's directory, e.g.
    /// `main/binary-amd64/Packages.gz`).
    pub fn index(&self, path: &str) -> Option<&IndexFile> {
        self.entries.iter().find(|(p, _)| p == path).map(|(_, f)| f)
    }
}

/// Refuses anything but exactly one clear-signed message: the first line opens it, one
/// signature block closes it, nothing but white space follows.
pub fn check_clearsigned(raw: &[u8]) -> Result<(), String> {
    let text = std::str::from_utf8(raw).map_err(|_| "it is not UTF-8 text".to_string())?;
    let count = |marker: &str| text.lines().filter(|l| l.trim_end() == marker).count();
    if text.lines().next().map(str::trim_end) != Some(BEGIN_SIGNED) {
        return Err(format!("it does not start with {BEGIN_SIGNED}"));
    }
    if count(BEGIN_SIGNED) != 1 || count(BEGIN_SIGNATURE) != 1 || count(END_SIGNATURE) != 1 {
        return Err("it is not exactly one clear-signed message".into());
    }
    let after = text
        .split_once(END_SIGNATURE)
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    if !after.trim().is_empty() {
        return Err("text follows the signature".into());
    }
    Ok(())
}

/// Runs `gpgv` on the clear-signed file at `signed` and returns the signed text alone.
/// `Err` carries gpgv's own explanation.
pub fn verify(gpgv: &Path, keyring: &Path, signed: &Path) -> Result<Vec<u8>, String> {
    let out = Command::new(gpgv)
        .arg("--keyring")
        .arg(keyring)
        .args(["--output", "-"])
        .arg(signed)
        .output()
        .map_err(|e| format!("cannot run {}: {e}", gpgv.display()))?;
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.trim();
        return Err(if why.is_empty() {
            format!("gpgv failed ({})", out.status)
        } else {
            format!("gpgv failed ({}): {why}", out.status)
        });
    }
    Ok(out.stdout)
}

/// Parses the signed text of a release file for `suite` (its `Suite:` or `Codename:`).
pub fn parse(signed: &[u8], suite: &str) -> Result<Release, String> {
    let text = std::str::from_utf8(signed).map_err(|_| "it is not UTF-8 text".to_string())?;
    let mut names = Vec::new();
    let mut acquire_by_hash = false;
    let mut entries: Vec<(String, IndexFile)> = Vec::new();
    let mut in_sha256 = false;
    for line in text.lines() {
        if line.trim().is_empty() {
            // One paragraph only; a blank line ends it.
            break;
        }
        if let Some(rest) = line.strip_prefix([' ', '\t']) {
            if in_sha256 {
                if let Some((path, file)) = index_line(rest) {
                    if let Some((_, known)) = entries.iter().find(|(p, _)| *p == path) {
                        if *known != file {
                            return Err(format!("it lists {path} twice with different digests"));
                        }
                    } else {
                        entries.push((path, file));
                    }
                }
            }
            continue;
        }
        let (key, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.trim();
        in_sha256 = key == "SHA256";
        match key {
            "Suite" | "Codename" => names.push(value.to_owned()),
            "Acquire-By-Hash" => acquire_by_hash = value.eq_ignore_ascii_case("yes"),
            _ => {}
        }
    }
    if !names.iter().any(|n| n == suite) {
        return Err(format!(
            "it describes suite {} instead of {suite}",
            if names.is_empty() {
                "(none named)".to_string()
            } else {
                names.join("/")
            }
        ));
    }
    if entries.is_empty() {
        return Err("it lists no SHA256 digests".into());
    }
    Ok(Release {
        acquire_by_hash,
        entries,
    })
}

/// ` <sha256> <size> <path>`; `None` for anything malformed.
fn index_line(line: &str) -> Option<(String, IndexFile)> {
    let mut words = line.split_whitespace();
    let sha256 = words.next()?.parse().ok()?;
    let size = words.next()?.parse().ok()?;
    let path = words.next()?.to_owned();
    words
        .next()
        .is_none()
        .then_some((path, IndexFile { sha256, size }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const H1: &str = "6777ea16514725f9427f48c240d92e0a6b8496138e37a1491d8597e66774e309";
    const H2: &str = "515e692f2c4121c6fcec444ef100cc18f79a991910615f3a88c8b7becfc94d2f";

    fn release_text() -> String {
        format!(
            "Origin: Debian\nSuite: oldstable\nCodename: bookworm\nAcquire-By-Hash: yes\n\
             MD5Sum:\n a8ed68071e02b40b231febcafb3f55aa 12084798 main/binary-amd64/Packages.gz\n\
             SHA256:\n {H2} 50060337 main/binary-amd64/Packages\n {H1} 12084798 main/binary-amd64/Packages.gz\n \
             nothex 12 main/x\n {H1} notasize main/y\n"
        )
    }

    #[test]
    fn sha256_entries_of_the_named_suite_are_found() {
        let r = parse(release_text().as_bytes(), "bookworm").unwrap();
        assert!(r.acquire_by_hash);
        assert_eq!(
            r.index("main/binary-amd64/Packages.gz"),
            Some(&IndexFile {
                sha256: H1.parse().unwrap(),
                size: 12_084_798
            })
        );
        // MD5 lines are not SHA256 lines, and malformed lines are no entries.
        assert_eq!(
            r.index("main/binary-amd64/Packages").unwrap().size,
            50_060_337
        );
        assert_eq!(r.index("main/x"), None);
        assert_eq!(r.index("main/y"), None);
        assert!(parse(release_text().as_bytes(), "oldstable").is_ok());
    }

    #[test]
    fn another_suites_index_is_refused() {
        let err = parse(release_text().as_bytes(), "trixie").unwrap_err();
        assert_eq!(
            err,
            "it describes suite oldstable/bookworm instead of trixie"
        );
        let err = parse(format!("SHA256:\n {H1} 1 a\n").as_bytes(), "bookworm").unwrap_err();
        assert!(err.contains("(none named)"), "{err}");
    }

    #[test]
    fn conflicting_or_missing_digests_are_refused() {
        let twice = format!("Suite: bookworm\nSHA256:\n {H1} 1 main/p\n {H2} 1 main/p\n");
        assert!(parse(twice.as_bytes(), "bookworm")
            .unwrap_err()
            .contains("twice"));
        let none = "Suite: bookworm\nMD5Sum:\n abc 1 main/p\n";
        assert_eq!(
            parse(none.as_bytes(), "bookworm").unwrap_err(),
            "it lists no SHA256 digests"
        );
        assert!(parse(b"\xff\xfe", "bookworm").is_err());
    }

    #[test]
    fn text_after_a_blank_line_is_not_part_of_the_release() {
        let text = format!("Suite: bookworm\nSHA256:\n {H1} 1 main/a\n\nSHA256:\n {H2} 2 main/b\n");
        let r = parse(text.as_bytes(), "bookworm").unwrap();
        assert!(r.index("main/a").is_some());
        assert_eq!(r.index("main/b"), None);
    }

    fn clearsigned(body: &str) -> String {
        format!(
            "{BEGIN_SIGNED}\nHash: SHA256\n\n{body}\n{BEGIN_SIGNATURE}\n\niQIz...\n{END_SIGNATURE}\n"
        )
    }

    #[test]
    fn only_a_single_clear_signed_message_passes_the_shape_check() {
        check_clearsigned(clearsigned("Suite: bookworm").as_bytes()).unwrap();
        let cases = [
            (
                "Suite: evil\n".to_string() + &clearsigned("Suite: bookworm"),
                "does not start",
            ),
            (
                clearsigned("Suite: bookworm") + "Suite: evil\n",
                "text follows",
            ),
            (
                clearsigned("Suite: bookworm") + &clearsigned("Suite: evil"),
                "exactly one",
            ),
            ("Suite: bookworm\n".to_string(), "does not start"),
        ];
        for (text, why) in cases {
            let err = check_clearsigned(text.as_bytes()).unwrap_err();
            assert!(err.contains(why), "{err} for {text}");
        }
    }

    #[test]
    fn gpgv_refuses_an_unsigned_file_and_says_why() {
        let gpgv = crate::hosttools::require_tool("gpgv", "gpgv").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("InRelease");
        std::fs::write(&file, clearsigned("Suite: bookworm")).unwrap();
        let err = verify(
            &gpgv,
            Path::new("/usr/share/keyrings/debian-archive-keyring.gpg"),
            &file,
        )
        .unwrap_err();
        assert!(err.starts_with("gpgv failed"), "{err}");
    }
}
