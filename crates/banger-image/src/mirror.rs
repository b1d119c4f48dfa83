//! Finding the Debian mirror the build host already uses, so debootstrap needs no configuration.
//!
//! Reads apt's sources in apt's own order (`sources.list`, then `sources.list.d/` alphabetically),
//! in both the one-line `*.list` format and the deb822 `*.sources` format, and returns the first
//! binary (`deb`) URI that serves the wanted suite. No mirror host is ever hard-coded: if the host
//! has none, the caller must get one from config.

use std::path::Path;

/// The suite banger's images are built from.
pub const BOOKWORM: &str = "bookworm";

/// The host's mirror for Debian 12, from `/etc/apt`.
pub fn host_debian_mirror() -> Option<String> {
    find_mirror(Path::new("/etc/apt"), BOOKWORM)
}

/// The first `deb` URI serving `suite` in the apt configuration under `apt_dir`.
pub fn find_mirror(apt_dir: &Path, suite: &str) -> Option<String> {
    let mut files = vec![apt_dir.join("sources.list")];
    if let Ok(entries) = std::fs::read_dir(apt_dir.join("sources.list.d")) {
        let mut names: Vec<_> = entries.filter_map(|e| e.ok()).map(|e| e.path()).collect();
        names.sort();
        files.extend(names);
    }
    files.into_iter().find_map(|path| {
        let ext = path.extension().and_then(|e| e.to_str())?;
        // Unreadable or missing files are simply not a source, as for apt itself.
        let text = std::fs::read_to_string(&path).ok()?;
        match ext {
            "list" => mirror_in_one_line(&text, suite),
            "sources" => mirror_in_deb822(&text, suite),
            _ => None,
        }
    })
}

/// `deb [options] URI SUITE COMPONENT...` lines.
pub fn mirror_in_one_line(text: &str, suite: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let line = line.split('#').next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next()? != "deb" {
            return None;
        }
        let mut uri = words.next()?;
        if uri.starts_with('[') {
            // Options may span several words: `[ arch=amd64 signed-by=/k.gpg ]`.
            let mut w = uri;
            while !w.ends_with(']') {
                w = words.next()?;
            }
            uri = words.next()?;
        }
        let s = words.next()?;
        (s == suite && is_usable_uri(uri)).then(|| uri.to_owned())
    })
}

/// deb822 stanzas: `Types:`, `URIs:`, `Suites:`, `Enabled:`.
pub fn mirror_in_deb822(text: &str, suite: &str) -> Option<String> {
    stanzas(text).into_iter().find_map(|fields| {
        let get = |k: &str| {
            fields
                .iter()
                .find(|(name, _)| name.eq_ignore_ascii_case(k))
                .map(|(_, v)| v.as_str())
                .unwrap_or("")
        };
        if get("Enabled").trim().eq_ignore_ascii_case("no") {
            return None;
        }
        if !get("Types").split_whitespace().any(|t| t == "deb") {
            return None;
        }
        if !get("Suites").split_whitespace().any(|s| s == suite) {
            return None;
        }
        get("URIs")
            .split_whitespace()
            .find(|u| is_usable_uri(u))
            .map(str::to_owned)
    })
}

fn stanzas(text: &str) -> Vec<Vec<(String, String)>> {
    let mut out = Vec::new();
    let mut cur: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with('#') {
            continue;
        }
        if line.trim().is_empty() {
            if !cur.is_empty() {
                out.push(std::mem::take(&mut cur));
            }
        } else if line.starts_with([' ', '\t']) {
            if let Some((_, v)) = cur.last_mut() {
                v.push(' ');
                v.push_str(line.trim());
            }
        } else if let Some((k, v)) = line.split_once(':') {
            cur.push((k.trim().to_owned(), v.trim().to_owned()));
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Schemes debootstrap can fetch from.
fn is_usable_uri(uri: &str) -> bool {
    ["http://", "https://", "file:/"]
        .iter()
        .any(|p| uri.starts_with(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_format_with_options_and_comments() {
        let text = "\
# deb http://commented.example/debian bookworm main
deb-src http://src.example/debian bookworm main
deb http://security.example/debian-security bookworm-security main
deb [ arch=amd64 signed-by=/usr/share/keyrings/k.gpg ] http://mirror.example/debian bookworm main contrib
deb http://later.example/debian bookworm main
";
        assert_eq!(
            mirror_in_one_line(text, "bookworm").as_deref(),
            Some("http://mirror.example/debian")
        );
        assert_eq!(
            mirror_in_one_line(
                "deb [trusted=yes] file:/srv/mirror bookworm main",
                "bookworm"
            )
            .as_deref(),
            Some("file:/srv/mirror")
        );
        assert_eq!(mirror_in_one_line(text, "trixie"), None);
    }

    #[test]
    fn deb822_format_skips_disabled_and_source_only_stanzas() {
        let text = "\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

# a comment between stanzas
Types: deb-src
URIs: http://src.example/debian
Suites: bookworm

Types: deb deb-src
URIs: cdrom:[Debian]/ https://mirror.example/debian
Suites: bookworm
 bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example/debian-security
Suites: bookworm-security
";
        assert_eq!(
            mirror_in_deb822(text, "bookworm").as_deref(),
            Some("https://mirror.example/debian")
        );
        assert_eq!(
            mirror_in_deb822(text, "bookworm-updates").as_deref(),
            Some("https://mirror.example/debian")
        );
        assert_eq!(
            mirror_in_deb822(text, "bookworm-security").as_deref(),
            Some("http://security.example/debian-security")
        );
    }

    #[test]
    fn apt_directory_is_read_in_apts_order_and_ignores_other_extensions() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("sources.list.d");
        std::fs::create_dir(&d).unwrap();
        std::fs::write(
            d.join("b.sources"),
            "Types: deb\nURIs: http://b.example/debian\nSuites: bookworm\n",
        )
        .unwrap();
        std::fs::write(
            d.join("a.list.disabled"),
            "deb http://disabled.example/debian bookworm main\n",
        )
        .unwrap();
        std::fs::write(
            d.join("c.list"),
            "deb http://c.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            find_mirror(dir.path(), "bookworm").as_deref(),
            Some("http://b.example/debian")
        );

        std::fs::write(
            dir.path().join("sources.list"),
            "deb http://main.example/debian bookworm main\n",
        )
        .unwrap();
        assert_eq!(
            find_mirror(dir.path(), "bookworm").as_deref(),
            Some("http://main.example/debian")
        );
        assert_eq!(find_mirror(dir.path(), "sid"), None);
        assert_eq!(find_mirror(&dir.path().join("missing"), "bookworm"), None);
    }

    #[test]
    fn this_build_host_has_a_bookworm_mirror() {
        // The real build below depends on it; failing here names the cause early.
        let m = host_debian_mirror()
            .expect("no bookworm mirror in /etc/apt; the image build needs one");
        assert!(m.starts_with("http"), "{m}");
    }
}
