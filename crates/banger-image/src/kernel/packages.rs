//! Finding the kernel in a suite's package index (`main/binary-amd64/Packages.gz`).
//!
//! The index is ~50 MB of deb822 stanzas; it is read as a stream (gunzip, then line by line)
//! and only the few fields of the stanzas that matter are kept: the meta-package
//! (`linux-image-cloud-amd64`) and the versioned kernel packages it could point at. Every
//! line, the total size and the number of kept stanzas are bounded, so a hostile index can
//! cost neither unbounded memory nor unbounded time. The index's digest was already checked
//! against the signed release file; the bounds are for what that signature cannot promise.

use std::io::{self, BufRead, Read};

use flate2::read::GzDecoder;

use crate::digest::Sha256Digest;

/// Limits for reading an index.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Longest line (Debian's longest is ~75 KiB, a `Provides:` list).
    pub max_line: usize,
    /// Most uncompressed bytes (bookworm's amd64 index is ~50 MB).
    pub max_total: u64,
    /// Most stanzas kept as candidates.
    pub max_kept: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_line: 1 << 20,
            max_total: 512 << 20,
            max_kept: 256,
        }
    }
}

/// The fields of one stanza that locate a package.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stanza {
    pub package: String,
    pub version: Option<String>,
    pub depends: Option<String>,
    pub filename: Option<String>,
    pub size: Option<String>,
    pub sha256: Option<String>,
}

/// A kernel package, fully located and validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelPackage {
    /// `6.1.0-50-cloud-amd64`: the directory under `/lib/modules` and the `vmlinuz-` suffix.
    pub release: String,
    /// `linux-image-6.1.0-50-cloud-amd64`.
    pub package: String,
    pub version: String,
    /// Relative to the mirror root, e.g. `pool/main/l/linux-signed-amd64/...deb`.
    pub filename: String,
    pub size: u64,
    pub sha256: Sha256Digest,
}

#[derive(Debug, thiserror::Error)]
pub enum PackagesError {
    #[error("cannot read the index")]
    Read(#[source] io::Error),
    #[error("line {line} is longer than {max} bytes")]
    LineTooLong { line: u64, max: usize },
    #[error("it is larger than {max} bytes uncompressed")]
    TooLarge { max: u64 },
    #[error("it has more than {max} stanzas for kernel packages")]
    TooManyStanzas { max: usize },
    #[error("{0}")]
    Kernel(String),
}

/// Reads one line (without its `\n`) into `buf`; `Ok(false)` at end of input.
fn read_line(r: &mut impl BufRead, buf: &mut Vec<u8>, max: usize) -> io::Result<Option<bool>> {
    buf.clear();
    loop {
        let available = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() { None } else { Some(true) });
        }
        let (take, done) = match available.iter().position(|b| *b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let room = max.saturating_sub(buf.len());
        let end = if done { take - 1 } else { take };
        if end > room {
            return Ok(Some(false));
        }
        buf.extend_from_slice(&available[..end]);
        r.consume(take);
        if done {
            return Ok(Some(true));
        }
    }
}

/// Whether a stanza for `package` is worth keeping while looking for `meta`'s kernel.
fn wanted(package: &str, meta: &str) -> bool {
    package == meta
        || (package.starts_with("linux-image-")
            && meta
                .strip_prefix("linux-image")
                .is_some_and(|flavour| package.ends_with(flavour)))
}

/// Streams an uncompressed index and keeps the stanzas of `meta` and of packages of the same
/// flavour (`linux-image-*-cloud-amd64` for `linux-image-cloud-amd64`).
pub fn scan(input: impl Read, meta: &str, limits: &Limits) -> Result<Vec<Stanza>, PackagesError> {
    let mut reader = io::BufReader::with_capacity(256 << 10, input.take(limits.max_total + 1));
    let mut kept = Vec::new();
    let mut current: Option<Stanza> = None;
    let mut line = Vec::new();
    let mut total: u64 = 0;
    let mut number: u64 = 0;
    let finish = |stanza: Option<Stanza>, kept: &mut Vec<Stanza>| {
        if let Some(s) = stanza.filter(|s| wanted(&s.package, meta)) {
            if kept.len() >= limits.max_kept {
                return Err(PackagesError::TooManyStanzas {
                    max: limits.max_kept,
                });
            }
            kept.push(s);
        }
        Ok(())
    };
    loop {
        number += 1;
        let complete = match read_line(&mut reader, &mut line, limits.max_line) {
            Ok(None) => break,
            Ok(Some(c)) => c,
            Err(e) => return Err(PackagesError::Read(e)),
        };
        if !complete {
            return Err(PackagesError::LineTooLong {
                line: number,
                max: limits.max_line,
            });
        }
        total += line.len() as u64 + 1;
        if total > limits.max_total {
            return Err(PackagesError::TooLarge {
                max: limits.max_total,
            });
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            finish(current.take(), &mut kept)?;
            continue;
        }
        if line.first().is_some_and(|b| *b == b' ' || *b == b'\t') {
            continue; // a continuation line: none of the kept fields has any
        }
        let Ok(text) = std::str::from_utf8(&line) else {
            continue;
        };
        let Some((key, value)) = text.split_once(':') else {
            continue;
        };
        let value = value.trim().to_owned();
        if key == "Package" {
            finish(current.take(), &mut kept)?;
            current = Some(Stanza {
                package: value,
                ..Stanza::default()
            });
            continue;
        }
        let Some(s) = current.as_mut() else {
            continue;
        };
        let slot = match key {
            "Version" => &mut s.version,
            "Depends" => &mut s.depends,
            "Filename" => &mut s.filename,
            "Size" => &mut s.size,
            "SHA256" => &mut s.sha256,
            _ => continue,
        };
        slot.get_or_insert(value);
    }
    finish(current.take(), &mut kept)?;
    Ok(kept)
}

/// [`scan`] of a gzip-compressed index.
pub fn scan_gz(
    input: impl Read,
    meta: &str,
    limits: &Limits,
) -> Result<Vec<Stanza>, PackagesError> {
    scan(GzDecoder::new(input), meta, limits)
}

/// Characters allowed in a kernel release (it becomes a directory and file name).
fn valid_release(release: &str) -> bool {
    !release.is_empty()
        && release.len() <= 64
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._+-".contains(&b))
        && !release.starts_with(['.', '-'])
}

/// A mirror-relative path of plain components, safe to append to the mirror URL.
fn valid_pool_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 1024
        && path.ends_with(".deb")
        && path.split('/').all(|c| {
            !c.is_empty()
                && c != "."
                && c != ".."
                && c.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._+-~%".contains(&b))
        })
}

/// Follows `meta`'s `Depends: linux-image-RELEASE (= VERSION)` to that package's stanza.
pub fn resolve(stanzas: &[Stanza], meta: &str) -> Result<KernelPackage, PackagesError> {
    let fail = |msg: String| Err(PackagesError::Kernel(msg));
    let metas: Vec<&Stanza> = stanzas.iter().filter(|s| s.package == meta).collect();
    let m = match metas.as_slice() {
        [] => return fail(format!("it has no package {meta}")),
        [m] => *m,
        _ => return fail(format!("it lists {meta} more than once")),
    };
    let depends = m.depends.as_deref().unwrap_or_default();
    let mut targets = depends.split(',').filter_map(|d| {
        let d = d.trim();
        // Alternatives (`a | b`) are not how Debian's kernel meta-packages are written.
        let (name, rest) = d.split_once(' ').unwrap_or((d, ""));
        let version = rest.trim().strip_prefix("(=")?.strip_suffix(')')?.trim();
        let release = name.strip_prefix("linux-image-")?;
        Some((name, release, version))
    });
    let Some((package, release, version)) = targets.next() else {
        return fail(format!(
            "{meta} does not depend on an exact linux-image-RELEASE version (Depends: {depends})"
        ));
    };
    if targets.next().is_some() {
        return fail(format!(
            "{meta} depends on more than one kernel (Depends: {depends})"
        ));
    }
    if !valid_release(release) {
        return fail(format!("{package} does not name a usable kernel release"));
    }
    let found: Vec<&Stanza> = stanzas
        .iter()
        .filter(|s| s.package == package && s.version.as_deref() == Some(version))
        .collect();
    let s = match found.as_slice() {
        [] => {
            return fail(format!(
                "it has no {package} at version {version}, which {meta} needs"
            ))
        }
        [s] => *s,
        _ => return fail(format!("it lists {package} {version} more than once")),
    };
    let filename = s.filename.clone().unwrap_or_default();
    if !valid_pool_path(&filename) {
        return fail(format!("{package} has an unusable Filename {filename:?}"));
    }
    let size = s.size.as_deref().and_then(|v| v.parse::<u64>().ok());
    let sha256 = s
        .sha256
        .as_deref()
        .and_then(|v| v.parse::<Sha256Digest>().ok());
    let (Some(size), Some(sha256)) = (size, sha256) else {
        return fail(format!("{package} lacks a valid Size or SHA256"));
    };
    Ok(KernelPackage {
        release: release.to_owned(),
        package: package.to_owned(),
        version: version.to_owned(),
        filename,
        size,
        sha256,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use flate2::write::GzEncoder;
    use std::io::Write;

    const SHA: &str = "6f32a25a6ee7b58852de01577ba261fda873c3002c736a2148bf0a6593bd93c8";
    const META: &str = "linux-image-cloud-amd64";

    fn index() -> String {
        format!(
            "Package: zsh\nVersion: 5.9-4\nDescription: shell\n long text\n\n\
             Package: linux-image-cloud-amd64\nSource: linux-signed-amd64 (6.1.176+1)\n\
             Version: 6.1.176-1\nProvides: linux-latest-modules-6.1.0-50-cloud-amd64\n\
             Depends: linux-image-6.1.0-50-cloud-amd64 (= 6.1.176-1)\n\
             Filename: pool/main/l/linux-signed-amd64/linux-image-cloud-amd64_6.1.176-1_amd64.deb\n\
             Size: 1500\nSHA256: {SHA}\n\n\
             Package: linux-image-6.1.0-50-cloud-amd64\nVersion: 6.1.176-1\n\
             Depends: kmod, linux-base (>= 4.3~), initramfs-tools (>= 0.120+deb8u2) | linux-initramfs-tool\n\
             Description: Linux 6.1 for x86-64 cloud\n The Linux kernel 6.1 and modules.\n\
             Filename: pool/main/l/linux-signed-amd64/linux-image-6.1.0-50-cloud-amd64_6.1.176-1_amd64.deb\n\
             Size: 26424228\nSHA256: {SHA}\n\n\
             Package: linux-image-6.1.0-50-amd64\nVersion: 6.1.176-1\n\n\
             Package: linux-image-6.1.0-49-cloud-amd64\nVersion: 6.1.175-1\nSize: 1\n"
        )
    }

    fn gz(text: &[u8]) -> Vec<u8> {
        let mut e = GzEncoder::new(Vec::new(), flate2::Compression::fast());
        e.write_all(text).unwrap();
        e.finish().unwrap()
    }

    #[test]
    fn the_meta_package_leads_to_the_versioned_kernel() {
        let kept = scan_gz(&gz(index().as_bytes())[..], META, &Limits::default()).unwrap();
        let names: Vec<&str> = kept.iter().map(|s| s.package.as_str()).collect();
        assert_eq!(
            names,
            [
                META,
                "linux-image-6.1.0-50-cloud-amd64",
                "linux-image-6.1.0-49-cloud-amd64"
            ]
        );
        let k = resolve(&kept, META).unwrap();
        assert_eq!(
            k,
            KernelPackage {
                release: "6.1.0-50-cloud-amd64".into(),
                package: "linux-image-6.1.0-50-cloud-amd64".into(),
                version: "6.1.176-1".into(),
                filename: "pool/main/l/linux-signed-amd64/linux-image-6.1.0-50-cloud-amd64_6.1.176-1_amd64.deb"
                    .into(),
                size: 26_424_228,
                sha256: SHA.parse().unwrap(),
            }
        );
    }

    #[test]
    fn a_missing_or_mismatched_kernel_stanza_is_an_error_naming_it() {
        let text = index().replace(
            "Version: 6.1.176-1\nDepends: kmod",
            "Version: 6.1.999-1\nDepends: kmod",
        );
        let kept = scan(text.as_bytes(), META, &Limits::default()).unwrap();
        let err = resolve(&kept, META).unwrap_err().to_string();
        assert_eq!(
            err,
            "it has no linux-image-6.1.0-50-cloud-amd64 at version 6.1.176-1, which linux-image-cloud-amd64 needs"
        );
        let err = resolve(&[], META).unwrap_err().to_string();
        assert_eq!(err, "it has no package linux-image-cloud-amd64");
    }

    #[test]
    fn hostile_filenames_releases_and_digests_are_refused() {
        let kept = scan(index().as_bytes(), META, &Limits::default()).unwrap();
        let with = |f: &dyn Fn(&mut Vec<Stanza>)| {
            let mut k = kept.clone();
            f(&mut k);
            resolve(&k, META).unwrap_err().to_string()
        };
        for bad in [
            "../../etc/passwd.deb",
            "/abs/k.deb",
            "pool//k.deb",
            "pool/k.tar",
            "pool/a b.deb",
            "http://x/k.deb",
        ] {
            let err = with(&|k| k[1].filename = Some(bad.into()));
            assert!(err.contains("unusable Filename"), "{bad}: {err}");
        }
        let err = with(&|k| k[1].sha256 = Some("sha256:../x".into()));
        assert!(err.contains("lacks a valid Size or SHA256"), "{err}");
        let err = with(&|k| k[1].size = Some("-1".into()));
        assert!(err.contains("lacks a valid Size or SHA256"), "{err}");
        let err = with(&|k| {
            k[0].depends = Some("linux-image-../../x (= 6.1.176-1)".into());
            k[1].package = "linux-image-../../x".into();
        });
        assert!(err.contains("usable kernel release"), "{err}");
        let err = with(&|k| k[0].depends = Some("linux-image-6.1.0-50-cloud-amd64".into()));
        assert!(err.contains("exact linux-image-RELEASE version"), "{err}");
        let err = with(&|k| k.push(k[0].clone()));
        assert!(err.contains("more than once"), "{err}");
    }

    #[test]
    fn oversized_lines_totals_and_stanza_floods_are_bounded() {
        let limits = Limits {
            max_line: 100,
            max_total: 10_000,
            max_kept: 2,
        };
        let long = format!("Package: a\nDescription: {}\n", "x".repeat(200));
        assert!(matches!(
            scan(long.as_bytes(), META, &limits),
            Err(PackagesError::LineTooLong { line: 2, max: 100 })
        ));
        let big = "Package: a\n\n".repeat(2000);
        assert!(matches!(
            scan(big.as_bytes(), META, &limits),
            Err(PackagesError::TooLarge { max: 10_000 })
        ));
        let flood = "Package: linux-image-1-cloud-amd64\n\n".repeat(3);
        assert!(matches!(
            scan(flood.as_bytes(), META, &limits),
            Err(PackagesError::TooManyStanzas { max: 2 })
        ));
        // A gzip bomb stops at the total, however small the compressed stream.
        let bomb = gz(&vec![b'\n'; 20_000]);
        assert!(bomb.len() < 1000);
        assert!(matches!(
            scan_gz(&bomb[..], META, &limits),
            Err(PackagesError::TooLarge { .. })
        ));
        // Not gzip at all.
        assert!(matches!(
            scan_gz(&b"plain text"[..], META, &limits),
            Err(PackagesError::Read(_))
        ));
    }

    #[test]
    fn lines_without_a_final_newline_and_binary_junk_are_handled() {
        let text = format!(
            "\u{0}\u{ff}garbage\nPackage: {META}\nVersion: 1\nDepends: linux-image-r (= 1)"
        );
        let kept = scan(text.as_bytes(), META, &Limits::default()).unwrap();
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].depends.as_deref(), Some("linux-image-r (= 1)"));
    }
}
