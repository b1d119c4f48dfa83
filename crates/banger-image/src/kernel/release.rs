//! The root of apt's trust chain: a suite's `InRelease` file, checked with `gpgv` against
//! Debian's archive keyring, and the digests of the package indexes it lists.
//!
//! Only the text `gpgv` says is signed is parsed (`--output -`), never the file around it, and
//! the file itself must be one clear-signed message and nothing else (apt's rule: text before
//! or after the signed part, or a second signed part, is how a signature gets smuggled past a
//! parser). The suite must name itself as the one asked for, so a mirror cannot answer
//! `bookworm` with another suite's correctly signed index.
//!
//! gpgv's exit status is not the verdict: gpgv 2.2 exits 0 for a signature by an expired or a
//! revoked key of the keyring. As apt does, banger reads gpgv's status lines (`--status-fd`)
//! and wants a `GOODSIG` and a `VALIDSIG` and none of `BADSIG`, `ERRSIG`, `EXPSIG`,
//! `EXPKEYSIG`, `REVKEYSIG`, `NODATA` ([`check_status`]). A release that says `Valid-Until`
//! is refused once that moment passed (a mirror replaying an old, correctly signed release
//! could otherwise hold back security fixes). Debian's stable suites, bookworm among them,
//! carry no `Valid-Until` (the security suite does), so for them replay is bounded only by
//! the kernel package digest chain, as for apt.

use std::path::Path;
use std::process::{Command, Stdio};

use time::{Month, OffsetDateTime};

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
    /// When the release stops being valid (`Valid-Until`), if it says so.
    pub valid_until: Option<OffsetDateTime>,
    entries: Vec<(String, IndexFile)>,
}

impl Release {
    /// The index at `path` (relative to the suite's directory, e.g.
    /// `main/binary-amd64/Packages.gz`).
    pub fn index(&self, path: &str) -> Option<&IndexFile> {
        self.entries.iter().find(|(p, _)| p == path).map(|(_, f)| f)
    }

    /// Refuses a release whose `Valid-Until` is before `now`.
    pub fn check_valid_until(&self, now: OffsetDateTime) -> Result<(), String> {
        match self.valid_until {
            Some(until) if until < now => Err(format!(
                "it expired on {} (Valid-Until), so the mirror serves an old release",
                rfc2822(until)
            )),
            _ => Ok(()),
        }
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

/// Runs `gpgv` on the clear-signed file at `signed` and returns the signed text alone, which
/// gpgv writes to `SIGNED.text` (removed again) while its status lines go to stdout.
/// `Err` carries gpgv's own explanation, or what its status lines refuse ([`check_status`]).
pub fn verify(gpgv: &Path, keyring: &Path, signed: &Path) -> Result<Vec<u8>, String> {
    let mut text_path = signed.as_os_str().to_owned();
    text_path.push(".text");
    let text_path = std::path::PathBuf::from(text_path);
    let out = Command::new(gpgv)
        .args(["--status-fd", "1"])
        .arg("--keyring")
        .arg(keyring)
        .arg("--output")
        .arg(&text_path)
        .arg(signed)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", gpgv.display()))?;
    let text =
        std::fs::File::open(&text_path).and_then(|f| crate::capped::read_at_most(f, MAX_INRELEASE));
    let _ = std::fs::remove_file(&text_path);
    if !out.status.success() {
        let why = String::from_utf8_lossy(&out.stderr);
        let why = why.trim();
        return Err(if why.is_empty() {
            format!("gpgv failed ({})", out.status)
        } else {
            format!("gpgv failed ({}): {why}", out.status)
        });
    }
    check_status(&String::from_utf8_lossy(&out.stdout))?;
    match text {
        Ok(Some(text)) => Ok(text),
        Ok(None) => Err(format!(
            "gpgv wrote more than {MAX_INRELEASE} bytes of signed text"
        )),
        Err(e) => Err(format!("cannot read the text gpgv verified: {e}")),
    }
}

/// Judges gpgv's status lines (`[GNUPG:] KEYWORD ARGS...`, one per line) like apt: at least one
/// good signature (`GOODSIG`, and `VALIDSIG` with the key's fingerprint, which gpgv prints only
/// for keys of the keyring) and no signature that is bad, expired, by an expired or revoked
/// key, or uncheckable (`ERRSIG`: unknown key or algorithm), and signed data present. Lines
/// that are not status lines count for nothing. gpg escapes line breaks inside a status line's
/// arguments, so a user ID cannot forge a line.
pub fn check_status(status: &str) -> Result<(), String> {
    let (mut good, mut valid) = (false, false);
    let mut refused = Vec::new();
    for line in status.lines() {
        let Some(rest) = line.strip_prefix("[GNUPG:] ") else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let keyword = words.next().unwrap_or("");
        let key: String = words
            .next()
            .unwrap_or("")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .take(40)
            .collect();
        let what = match keyword {
            "GOODSIG" => {
                good = true;
                continue;
            }
            "VALIDSIG" => {
                valid = true;
                continue;
            }
            "BADSIG" => "a bad signature",
            "ERRSIG" => "a signature that cannot be checked (its key is not in the keyring, or its algorithm is unknown)",
            "EXPSIG" => "an expired signature",
            "EXPKEYSIG" => "a signature by an expired key",
            "REVKEYSIG" => "a signature by a revoked key",
            "NODATA" => "no signed data",
            _ => continue,
        };
        refused.push(format!("{what} ({keyword} {key})"));
    }
    if !refused.is_empty() {
        refused.truncate(4);
        return Err(format!("gpgv reports {}", refused.join(", ")));
    }
    if !(good && valid) {
        return Err("gpgv reports no good signature by a key of the keyring".into());
    }
    Ok(())
}

/// Parses the signed text of a release file for `suite` (its `Suite:` or `Codename:`).
pub fn parse(signed: &[u8], suite: &str) -> Result<Release, String> {
    let text = std::str::from_utf8(signed).map_err(|_| "it is not UTF-8 text".to_string())?;
    let mut names = Vec::new();
    let mut acquire_by_hash = false;
    let mut valid_until = None;
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
            "Valid-Until" => {
                valid_until = Some(parse_date(value).ok_or_else(|| {
                    format!(
                        "its Valid-Until `{}` is not a date banger can read",
                        value
                            .chars()
                            .take(64)
                            .flat_map(char::escape_default)
                            .collect::<String>()
                    )
                })?);
            }
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
        valid_until,
        entries,
    })
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// A release file date as Debian writes it (RFC 2822 in UTC): `[Mon, ]07 Dec 2026 00:22:33 UTC`
/// (`GMT`, `Z` and `+0000` name UTC too). Anything else is `None`.
fn parse_date(value: &str) -> Option<OffsetDateTime> {
    let mut words: Vec<&str> = value.split_whitespace().collect();
    if words.first().is_some_and(|w| w.ends_with(',')) {
        words.remove(0);
    }
    let [day, month, year, clock, zone] = words[..] else {
        return None;
    };
    if !matches!(zone, "UTC" | "GMT" | "Z" | "+0000") {
        return None;
    }
    let month_index = MONTHS.iter().position(|m| *m == month)?;
    let month = Month::try_from(u8::try_from(month_index + 1).ok()?).ok()?;
    let mut hms = clock.split(':').map(|n| n.parse::<u8>().ok());
    let (Some(Some(h)), Some(Some(m)), Some(Some(s)), None) =
        (hms.next(), hms.next(), hms.next(), hms.next())
    else {
        return None;
    };
    let date = time::Date::from_calendar_date(year.parse().ok()?, month, day.parse().ok()?).ok()?;
    Some(date.with_hms(h, m, s).ok()?.assume_utc())
}

/// `Mon, 07 Dec 2026 00:22:33 UTC`, for messages.
fn rfc2822(t: OffsetDateTime) -> String {
    let month = MONTHS[usize::from(u8::from(t.month())) - 1];
    format!(
        "{}, {:02} {month} {} {:02}:{:02}:{:02} UTC",
        t.weekday().to_string().chars().take(3).collect::<String>(),
        t.day(),
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
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

    /// What gpgv 2.2.40 printed with `--status-fd 1` for bookworm's InRelease and Debian's
    /// keyring.
    const DEBIAN_GOOD: &str = "\
[GNUPG:] PLAINTEXT 74 0 
[GNUPG:] NEWSIG
[GNUPG:] KEY_CONSIDERED B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8 0
[GNUPG:] SIG_ID AgpdPZ7z8h3tPdbJ5G8ASdhxELQ 2026-07-11 1783765031
[GNUPG:] GOODSIG 6ED0E7B82643E131 Debian Archive Automatic Signing Key (12/bookworm) <ftpmaster@debian.org>
[GNUPG:] VALIDSIG 4CB50190207B4758A3F73A796ED0E7B82643E131 2026-07-11 1783765031 0 4 0 1 8 01 B8B80B5B623EAB6AD8775C45B7C5D7D6350947F8
[GNUPG:] NEWSIG
[GNUPG:] GOODSIG F8D2585B8783D481 Debian Stable Release Key (12/bookworm) <debian-release@lists.debian.org>
[GNUPG:] VALIDSIG 4D64FEC119C2029067D6E791F8D2585B8783D481 2026-07-11 1783765141 0 4 0 22 8 01 4D64FEC119C2029067D6E791F8D2585B8783D481
";

    #[test]
    fn gpgv_status_needs_a_good_valid_signature_and_no_bad_one() {
        check_status(DEBIAN_GOOD).unwrap();
        // gpgv 2.2.40 exits 0 for these two (a signature by an expired or a revoked key in the
        // keyring): only the status lines tell.
        let expired = "\
[GNUPG:] NEWSIG
[GNUPG:] KEYEXPIRED 1793694664
[GNUPG:] EXPKEYSIG B82E216A3B4888EA Expired Test <e@x>
[GNUPG:] VALIDSIG DBBE177A8E30AFD3728ABEF7B82E216A3B4888EA 2026-11-02 1793608324 0 4 0 22 8 01 DBBE177A8E30AFD3728ABEF7B82E216A3B4888EA
";
        let err = check_status(expired).unwrap_err();
        assert!(
            err.contains("expired key") && err.contains("B82E216A3B4888EA"),
            "{err}"
        );
        let revoked = "\
[GNUPG:] REVKEYSIG 8F000DB20980888F Revoked C <c@x>
[GNUPG:] VALIDSIG F122D88713F915B218A0B0208F000DB20980888F 2026-12-02 1796200271 0 4 0 22 8 01 F122D88713F915B218A0B0208F000DB20980888F
";
        assert!(check_status(revoked).unwrap_err().contains("revoked key"));
        // One good signature does not excuse a bad, expired or uncheckable one next to it.
        for (extra, why) in [
            ("[GNUPG:] BADSIG 1111222233334444 Someone <s@x>\n", "bad signature"),
            (
                "[GNUPG:] ERRSIG FE6C893922DE53CC 22 8 01 1796200271 9 35E5F35A\n[GNUPG:] NO_PUBKEY FE6C893922DE53CC\n",
                "cannot be checked",
            ),
            ("[GNUPG:] EXPSIG 1111222233334444 Someone <s@x>\n", "expired signature"),
            ("[GNUPG:] NODATA 1\n", "no signed data"),
        ] {
            let err = check_status(&format!("{DEBIAN_GOOD}{extra}")).unwrap_err();
            assert!(err.contains(why), "{extra}: {err}");
        }
        // GOODSIG without VALIDSIG, VALIDSIG without GOODSIG, nothing at all.
        let good_only: String = DEBIAN_GOOD
            .lines()
            .filter(|l| !l.contains("VALIDSIG"))
            .map(|l| format!("{l}\n"))
            .collect();
        for stream in [
            good_only.as_str(),
            "[GNUPG:] VALIDSIG AB 2026-01-01\n",
            "",
            "junk\n",
        ] {
            let err = check_status(stream).unwrap_err();
            assert!(err.contains("no good signature"), "{stream}: {err}");
        }
        // Only real status lines count: text that merely mentions GOODSIG does not.
        let fake = "gpgv: [GNUPG:] GOODSIG 1\n GOODSIG 2\nGOODSIG 3\n[GNUPG:] VALIDSIG AB\n";
        assert!(check_status(fake).is_err());
        // A hostile key id is shortened and printed harmlessly.
        let long = format!("[GNUPG:] BADSIG {}\u{1b}[2J\n", "A".repeat(500));
        let err = check_status(&format!("{DEBIAN_GOOD}{long}")).unwrap_err();
        assert!(err.len() < 300 && !err.contains('\u{1b}'), "{err}");
    }

    #[test]
    fn an_expired_release_is_refused() {
        let at = |s: &str| {
            time::OffsetDateTime::parse(s, &time::format_description::well_known::Rfc3339).unwrap()
        };
        let text = |extra: &str| format!("Suite: bookworm\n{extra}SHA256:\n {H1} 1 main/p\n");
        // As Debian writes it (bookworm-security has one; bookworm itself has none).
        let r = parse(
            text("Valid-Until: Mon, 07 Dec 2026 00:22:33 UTC\n").as_bytes(),
            "bookworm",
        )
        .unwrap();
        assert_eq!(r.valid_until, Some(at("2026-12-07T00:22:33Z")));
        r.check_valid_until(at("2026-12-07T00:22:32Z")).unwrap();
        let err = r.check_valid_until(at("2026-12-07T00:22:34Z")).unwrap_err();
        assert!(
            err.contains("expired") && err.contains("Mon, 07 Dec 2026 00:22:33 UTC"),
            "{err}"
        );
        // No Valid-Until: never expires (bookworm's main suite).
        let r = parse(text("").as_bytes(), "bookworm").unwrap();
        assert_eq!(r.valid_until, None);
        r.check_valid_until(at("2100-01-01T00:00:00Z")).unwrap();
        // Without the weekday, and in GMT, as RFC 2822 allows.
        let r = parse(
            text("Valid-Until: 7 Dec 2026 00:22:33 GMT\n").as_bytes(),
            "bookworm",
        )
        .unwrap();
        assert_eq!(r.valid_until, Some(at("2026-12-07T00:22:33Z")));
        // A date banger cannot read is refused, not ignored.
        for bad in [
            "tomorrow",
            "Mon, 07 Dec 2026 00:22:33 PST",
            "Mon, 32 Dec 2026 00:22:33 UTC",
            "Mon, 07 Foo 2026 00:22:33 UTC",
            "Mon, 07 Dec 2026 25:00:00 UTC",
            "Mon, 07 Dec 2026 00:22:33 UTC extra",
            "",
        ] {
            let err = parse(
                text(&format!("Valid-Until: {bad}\n")).as_bytes(),
                "bookworm",
            )
            .unwrap_err();
            assert!(err.contains("Valid-Until"), "{bad}: {err}");
        }
    }

    /// A test keyring (made with gpg, clock set to 2024-01-01): `good` never expires,
    /// `expired` expired on 2024-01-02, `revoked` carries its revocation. Base64 of the binary
    /// keyring gpgv reads.
    const TEST_KEYRING: &str = "\
mDMEZZIAgBYJKwYBBAHaRw8BAQdARLMja3PTMOmO0Ri6dLSrgBp9CuZzGcxgAdQ2Erdoc8G0HGJhbmdlciB0ZXN0IGdvb2Qg
PGdvb2RAdGVzdD6IkAQTFggAOBYhBCnVi/SKR0g16qvRJ5fZeIGSTJtvBQJlkgCAAhsDBQsJCAcCBhUKCQgLAgQWAgMBAh4B
AheAAAoJEJfZeIGSTJtvWA4A/ApgM0OWNtoAPdgKzfJzo1A51mVjSec01df8wB85NreSAQCwOZr3IG27MKu1S4ALBtnRRdof
eU2FZb+pLOjzh/PSDZgzBGWSAIAWCSsGAQQB2kcPAQEHQLNHdUIiHjCs7YIIqQV6AHDItsdFIh/lDTrpOy7B5XO/tCJiYW5n
ZXIgdGVzdCBleHBpcmVkIDxleHBpcmVkQHRlc3Q+iJYEExYIAD4WIQQ0Ph8zIr5JseBkqScB7LVxtw9R6AUCZZIAgAIbAwUJ
AAFRgAULCQgHAgYVCgkICwIEFgIDAQIeAQIXgAAKCRAB7LVxtw9R6MwJAP9W+GdbFBnQ2QLfAQM9Kc6UTPTDauE7cSYaZocE
KW5hsAD/U32nZDjgPEz1NLKmlQ7LWAN82iMOuTKLwKN6bHM1qwyYMwRlkgCAFgkrBgEEAdpHDwEBB0BTeQtMyXaQZCdnLXLa
d7mUr1v7YF09aWUHmC14fS5ufYh4BCAWCAAgFiEEkzjNn/Pm9+31AmyKsouHHG5/A9cFAmWSAIACHQAACgkQsouHHG5/A9ft
xQEAohpSNWsrIe8JdFW3hZyJdCR96+7vC7MyKzCFFisU6IwA/1jxg0VCKR8hFG+9WpHZG314DGSgwJpG3QOVXm1t4VoOtCJi
YW5nZXIgdGVzdCByZXZva2VkIDxyZXZva2VkQHRlc3Q+iJAEExYIADgWIQSTOM2f8+b37fUCbIqyi4ccbn8D1wUCZZIAgAIb
AwULCQgHAgYVCgkICwIEFgIDAQIeAQIXgAAKCRCyi4ccbn8D18QDAQC6mgfynEQtGYvBVNIYftDfGD3qbii6CVC+dci2T7QU
gQD/b2rUUPE/Asf28kymd8h12Vpj2e26omkLjWNGulPfEQM=";

    /// The release text the test keys signed (on 2024-01-01).
    const TEST_RELEASE: &str = "Suite: bookworm\nSHA256:\n \
        6777ea16514725f9427f48c240d92e0a6b8496138e37a1491d8597e66774e309 1 main/p\n";

    /// The armored signature lines each test key made over [`TEST_RELEASE`].
    const SIG_GOOD: &str = "iIAEARYIACgWIQQp1Yv0ikdINeqr0SeX2XiBkkybbwUCZZIAvAocZ29vZEB0ZXN0
AAoJEJfZeIGSTJtvnWgA/1sasDH64uloTXy8ij5lMt3xCecfUS5Q0Wax1z2cHAzZ
AP91wLlfKe5/uoN+D/YBwtfq3YMIo7jixI2cpqC8iFJqBg==
=8oyF
";
    const SIG_EXPIRED: &str = "iIMEARYIACsWIQQ0Ph8zIr5JseBkqScB7LVxtw9R6AUCZZIAvA0cZXhwaXJlZEB0
ZXN0AAoJEAHstXG3D1HoegkBAJbss5JjRM7sHXC+tNYxpn08QYA9HMEw601pqzSm
NxQQAP9z72teVhaU5fb9992R+9OPAZIVp5wC848jO/ACRAakDg==
=g9OS
";
    const SIG_REVOKED: &str = "iIMEARYIACsWIQSTOM2f8+b37fUCbIqyi4ccbn8D1wUCZZIAvA0ccmV2b2tlZEB0
ZXN0AAoJELKLhxxufwPX2GkBAP2C40P5aDJ0zi9U2syh9tuEybEtPJbgw8sc3lsl
FnhsAP4hXzlhPGLpk6hqerVRBXi46N9aQeEQ/UB4z4smvJGjAw==
=KKYd
";

    /// [`TEST_RELEASE`] clear-signed with one of those signatures.
    fn signed_by(signature: &str) -> String {
        format!(
            "{BEGIN_SIGNED}\nHash: SHA256\n\n{TEST_RELEASE}{BEGIN_SIGNATURE}\n\n{signature}{END_SIGNATURE}\n"
        )
    }

    #[test]
    fn gpgv_accepts_a_good_key_and_refuses_expired_and_revoked_ones() {
        use base64::Engine;
        let gpgv = crate::hosttools::require_tool("gpgv", "gpgv").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let keyring = dir.path().join("test.gpg");
        let raw: String = TEST_KEYRING.split_whitespace().collect();
        std::fs::write(
            &keyring,
            base64::engine::general_purpose::STANDARD
                .decode(raw)
                .unwrap(),
        )
        .unwrap();
        let file = dir.path().join("InRelease");
        std::fs::write(&file, signed_by(SIG_GOOD)).unwrap();
        let text = verify(&gpgv, &keyring, &file).unwrap();
        assert!(
            text.starts_with(b"Suite: bookworm\n"),
            "{}",
            String::from_utf8_lossy(&text)
        );
        parse(&text, "bookworm").unwrap();
        // gpgv itself exits 0 for these: the status lines must refuse them.
        for (signed, why) in [(SIG_EXPIRED, "expired key"), (SIG_REVOKED, "revoked key")] {
            std::fs::write(&file, signed_by(signed)).unwrap();
            let err = verify(&gpgv, &keyring, &file).unwrap_err();
            assert!(err.contains(why), "{err}");
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
