//! Golden-image recipes: what a locally built image contains and how it is configured.
//!
//! Recipes are data, kept in the repository's `images/` directory and compiled in. A recipe names
//! the Debian suite and packages for debootstrap, files to write, systemd units to mask or enable,
//! and shell steps run inside the new root (some optional, e.g. fetching mise). This module parses
//! and validates them; `build` executes them. [`Recipe::digest`] identifies a recipe's exact text, so
//! the daemon can tell when a cached image is stale.

use crate::digest::Sha256Digest;
use crate::ext4::MiB;
use serde::Deserialize;
use std::collections::HashSet;

const BUILTIN: [(&str, &str); 2] = [
    (
        "debian-bookworm",
        include_str!("../../../images/debian-bookworm.toml"),
    ),
    (
        "debian-bookworm-slim",
        include_str!("../../../images/debian-bookworm-slim.toml"),
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum RecipeError {
    #[error("recipe is not valid TOML or has unknown/missing fields")]
    Toml(#[source] toml::de::Error),
    #[error("recipe `{recipe}`: {problem}")]
    Invalid { recipe: String, problem: String },
}

/// A file the recipe writes into the image (replacing whatever a package put there).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileSpec {
    /// Absolute path inside the image.
    pub path: String,
    pub mode: u32,
    pub content: String,
}

/// A shell script run inside the image with `/bin/sh -eu -c`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub run: String,
    /// When true, failure yields a notice (`on_failure`) instead of failing the build.
    pub optional: bool,
    pub on_failure: Option<String>,
}

/// A validated recipe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub name: String,
    pub description: String,
    /// Debian suite, e.g. "bookworm".
    pub suite: String,
    /// debootstrap variant, e.g. "minbase".
    pub variant: String,
    /// Debian architecture, e.g. "amd64".
    pub arch: String,
    pub components: Vec<String>,
    pub packages: Vec<String>,
    pub files: Vec<FileSpec>,
    pub mask_units: Vec<String>,
    pub enable_units: Vec<String>,
    pub steps: Vec<Step>,
    /// Free space left in the root filesystem above its content.
    pub headroom: MiB,
    source: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRecipe {
    name: String,
    description: String,
    suite: String,
    #[serde(default = "default_variant")]
    variant: String,
    #[serde(default = "default_arch")]
    arch: String,
    #[serde(default = "default_components")]
    components: Vec<String>,
    headroom_mib: u64,
    packages: Vec<String>,
    #[serde(default, rename = "file")]
    files: Vec<RawFile>,
    #[serde(default)]
    units: RawUnits,
    #[serde(default, rename = "step")]
    steps: Vec<RawStep>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    path: String,
    mode: String,
    content: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawUnits {
    #[serde(default)]
    mask: Vec<String>,
    #[serde(default)]
    enable: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: String,
    run: String,
    #[serde(default)]
    optional: bool,
    on_failure: Option<String>,
}

fn default_variant() -> String {
    "minbase".into()
}
fn default_arch() -> String {
    "amd64".into()
}
fn default_components() -> Vec<String> {
    vec!["main".into()]
}

/// The built-in recipe called `name`.
pub fn builtin(name: &str) -> Option<Recipe> {
    let (_, text) = BUILTIN.iter().find(|(n, _)| *n == name)?;
    // The built-in texts are checked by unit tests, so a parse failure here cannot ship.
    Recipe::parse(text).ok()
}

/// Names of all built-in recipes.
pub fn builtin_names() -> Vec<&'static str> {
    BUILTIN.iter().map(|(n, _)| *n).collect()
}

impl Recipe {
    /// Parses and validates a recipe's TOML text.
    pub fn parse(text: &str) -> Result<Recipe, RecipeError> {
        let raw: RawRecipe = toml::from_str(text).map_err(RecipeError::Toml)?;
        let invalid = |problem: String| RecipeError::Invalid {
            recipe: raw.name.clone(),
            problem,
        };
        if !is_simple_name(&raw.name) {
            return Err(invalid(format!(
                "name `{}` must be lowercase letters, digits, '-' or '.'",
                raw.name
            )));
        }
        for (what, v) in [
            ("suite", &raw.suite),
            ("variant", &raw.variant),
            ("arch", &raw.arch),
        ] {
            if !is_simple_name(v) {
                return Err(invalid(format!("{what} `{v}` is not a plain name")));
            }
        }
        if raw.packages.is_empty() {
            return Err(invalid("lists no packages".into()));
        }
        let mut seen = HashSet::new();
        for p in raw.packages.iter().chain(&raw.components) {
            if !is_package_name(p) {
                return Err(invalid(format!(
                    "`{p}` is not a Debian package or component name"
                )));
            }
            if !seen.insert(p.as_str()) {
                return Err(invalid(format!("`{p}` is listed twice")));
            }
        }
        let mut files = Vec::with_capacity(raw.files.len());
        let mut paths = HashSet::new();
        for f in raw.files {
            if !is_safe_image_path(&f.path) {
                return Err(invalid(format!(
                    "file path `{}` must be absolute, without `..`, `//` or a trailing `/`",
                    f.path
                )));
            }
            if !paths.insert(f.path.clone()) {
                return Err(invalid(format!("file `{}` is written twice", f.path)));
            }
            let mode = u32::from_str_radix(&f.mode, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| {
                    invalid(format!(
                        "file `{}` has mode `{}`, expected octal like \"0644\"",
                        f.path, f.mode
                    ))
                })?;
            files.push(FileSpec {
                path: f.path,
                mode,
                content: f.content,
            });
        }
        for u in raw.units.mask.iter().chain(&raw.units.enable) {
            if !is_unit_name(u) {
                return Err(invalid(format!(
                    "`{u}` is not a systemd unit name like `foo.service`"
                )));
            }
        }
        let mut names = HashSet::new();
        let mut steps = Vec::with_capacity(raw.steps.len());
        for s in raw.steps {
            if s.name.trim().is_empty() || !names.insert(s.name.clone()) {
                return Err(invalid(format!(
                    "step name `{}` is empty or used twice",
                    s.name
                )));
            }
            if s.on_failure.is_some() && !s.optional {
                return Err(invalid(format!(
                    "step `{}` has on_failure but is not optional",
                    s.name
                )));
            }
            steps.push(Step {
                name: s.name,
                run: s.run,
                optional: s.optional,
                on_failure: s.on_failure,
            });
        }
        Ok(Recipe {
            name: raw.name,
            description: raw.description,
            suite: raw.suite,
            variant: raw.variant,
            arch: raw.arch,
            components: raw.components,
            packages: raw.packages,
            files,
            mask_units: raw.units.mask,
            enable_units: raw.units.enable,
            steps,
            headroom: MiB(raw.headroom_mib),
            source: text.to_owned(),
        })
    }

    /// SHA-256 of the recipe's source text: a cache key that changes whenever the recipe does.
    pub fn digest(&self) -> Sha256Digest {
        Sha256Digest::of_bytes(self.source.as_bytes())
    }

    /// The recipe's TOML text as parsed.
    pub fn source(&self) -> &str {
        &self.source
    }
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
}

fn is_package_name(s: &str) -> bool {
    s.len() >= 2
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c))
}

fn is_unit_name(s: &str) -> bool {
    let Some((stem, kind)) = s.rsplit_once('.') else {
        return false;
    };
    !stem.is_empty()
        && [
            "service",
            "socket",
            "timer",
            "target",
            "mount",
            "path",
            "device",
            "slice",
            "scope",
            "swap",
            "automount",
        ]
        .contains(&kind)
        && stem
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.@:\\".contains(c))
}

/// Absolute, normalised, and free of `..`: it cannot name anything outside the image root.
pub(crate) fn is_safe_image_path(p: &str) -> bool {
    p.starts_with('/')
        && p.len() > 1
        && !p.ends_with('/')
        && !p.contains('\0')
        && p[1..]
            .split('/')
            .all(|c| !c.is_empty() && c != "." && c != "..")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn minimal(extra: &str) -> String {
        format!(
            "name = \"t\"\ndescription = \"d\"\nsuite = \"bookworm\"\nheadroom_mib = 1\npackages = [\"systemd\"]\n{extra}"
        )
    }

    #[test]
    fn every_builtin_recipe_parses() {
        assert_eq!(builtin_names(), ["debian-bookworm", "debian-bookworm-slim"]);
        for (name, text) in BUILTIN {
            let r = Recipe::parse(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(r.name, name);
            assert_eq!(builtin(name), Some(r));
        }
        assert_eq!(builtin("nope"), None);
    }

    #[test]
    fn slim_recipe_has_exactly_the_boot_essentials() {
        let r = builtin("debian-bookworm-slim").unwrap();
        let mut pkgs = r.packages.clone();
        pkgs.sort();
        assert_eq!(
            pkgs,
            [
                "ca-certificates",
                "dbus",
                "git",
                "initramfs-tools",
                "iproute2",
                "linux-image-cloud-amd64",
                "openssh-server",
                "systemd",
                "systemd-sysv",
                "udev"
            ]
        );
        assert_eq!(
            (r.suite.as_str(), r.variant.as_str(), r.arch.as_str()),
            ("bookworm", "minbase", "amd64")
        );
        assert!(
            r.steps.iter().all(|s| !s.optional),
            "slim has no network-dependent steps"
        );
    }

    #[test]
    fn full_recipe_is_a_superset_of_slim_with_developer_tools_and_optional_mise() {
        let slim = builtin("debian-bookworm-slim").unwrap();
        let full = builtin("debian-bookworm").unwrap();
        for p in &slim.packages {
            assert!(full.packages.contains(p), "full lacks {p}");
        }
        for p in [
            "docker.io",
            "git",
            "jq",
            "curl",
            "build-essential",
            "vim-tiny",
            "less",
            "procps",
            "iputils-ping",
            "unzip",
            "xz-utils",
            "sudo",
            "locales",
            "man-db",
        ] {
            assert!(full.packages.contains(&p.to_string()), "full lacks {p}");
        }
        for f in &slim.files {
            assert!(
                full.files.contains(f),
                "full differs from slim in {}",
                f.path
            );
        }
        for u in &slim.mask_units {
            assert!(full.mask_units.contains(u), "full does not mask {u}");
        }
        for s in &slim.steps {
            assert!(full.steps.contains(s), "full lacks step {}", s.name);
        }
        let mise = full
            .steps
            .iter()
            .find(|s| s.name == "install mise")
            .unwrap();
        assert!(mise.optional);
        assert!(mise.on_failure.as_deref().unwrap().contains("mise"));
        // mise needs the build host's resolver, so it must run before resolv.conf is reset.
        let pos = |n: &str| full.steps.iter().position(|s| s.name == n).unwrap();
        assert!(pos("install mise") < pos("reset resolv.conf"));
    }

    #[test]
    fn both_recipes_harden_sshd_and_set_up_root_disk() {
        for name in builtin_names() {
            let r = builtin(name).unwrap();
            let file = |p: &str| {
                r.files
                    .iter()
                    .find(|f| f.path == p)
                    .unwrap_or_else(|| panic!("{name} lacks {p}"))
            };
            let sshd = file("/etc/ssh/sshd_config.d/10-banger.conf");
            for line in [
                "PermitRootLogin prohibit-password",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "ChallengeResponseAuthentication no",
                "PubkeyAuthentication yes",
            ] {
                assert!(sshd.content.lines().any(|l| l == line), "{name}: {line}");
            }
            assert_eq!(sshd.mode, 0o644);
            assert!(file("/etc/fstab")
                .content
                .contains("/dev/vda / ext4 defaults 0 1"));
            assert!(!file("/etc/hostname").content.trim().is_empty());
            let steps: String = r.steps.iter().map(|s| s.run.as_str()).collect();
            assert!(steps.contains("rm -f /etc/ssh/ssh_host_*"), "{name}");
            assert!(steps.contains("usermod -p '*' root"), "{name}");
            assert!(steps.contains("rm -rf /var/lib/apt/lists/*"), "{name}");
            for u in [
                "getty@tty1.service",
                "e2scrub_reap.service",
                "ifupdown-pre.service",
                "apt-daily.timer",
                "apt-daily-upgrade.timer",
                "man-db.timer",
            ] {
                assert!(
                    r.mask_units.iter().any(|m| m == u),
                    "{name} does not mask {u}"
                );
            }
        }
    }

    #[test]
    fn digest_follows_the_source_text() {
        let a = Recipe::parse(&minimal("")).unwrap();
        let b = Recipe::parse(&minimal("# comment\n")).unwrap();
        assert_eq!(a.digest(), Recipe::parse(&minimal("")).unwrap().digest());
        assert_ne!(a.digest(), b.digest());
        assert_ne!(
            builtin("debian-bookworm").unwrap().digest(),
            builtin("debian-bookworm-slim").unwrap().digest()
        );
    }

    #[test]
    fn defaults_apply_for_variant_arch_and_components() {
        let r = Recipe::parse(&minimal("")).unwrap();
        assert_eq!(r.variant, "minbase");
        assert_eq!(r.arch, "amd64");
        assert_eq!(r.components, ["main"]);
        assert_eq!(r.headroom, MiB(1));
    }

    #[test]
    fn invalid_recipes_are_rejected_with_the_problem_named() {
        let cases = [
            ("colour = \"red\"\n", "unknown field"),
            (
                "[[file]]\npath = \"etc/x\"\nmode = \"0644\"\ncontent = \"\"\n",
                "must be absolute",
            ),
            (
                "[[file]]\npath = \"/etc/../x\"\nmode = \"0644\"\ncontent = \"\"\n",
                "must be absolute",
            ),
            (
                "[[file]]\npath = \"/etc/x\"\nmode = \"rw\"\ncontent = \"\"\n",
                "expected octal",
            ),
            ("[units]\nmask = [\"getty\"]\n", "not a systemd unit name"),
            (
                "[[step]]\nname = \"a\"\nrun = \"true\"\n[[step]]\nname = \"a\"\nrun = \"true\"\n",
                "used twice",
            ),
            (
                "[[step]]\nname = \"a\"\nrun = \"true\"\non_failure = \"x\"\n",
                "not optional",
            ),
        ];
        for (extra, want) in cases {
            let err = Recipe::parse(&minimal(extra)).unwrap_err();
            let msg = format!(
                "{err} {}",
                std::error::Error::source(&err)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(msg.contains(want), "{extra:?}: {msg}");
        }
        let dup = minimal("").replace("[\"systemd\"]", "[\"systemd\", \"systemd\"]");
        assert!(Recipe::parse(&dup)
            .unwrap_err()
            .to_string()
            .contains("listed twice"));
        let bad_pkg = minimal("").replace("[\"systemd\"]", "[\"systemd; rm -rf /\"]");
        assert!(Recipe::parse(&bad_pkg)
            .unwrap_err()
            .to_string()
            .contains("not a Debian package"));
    }

    #[test]
    fn safe_image_paths() {
        for ok in ["/etc/hostname", "/etc/ssh/sshd_config.d/10-banger.conf"] {
            assert!(is_safe_image_path(ok), "{ok}");
        }
        for bad in ["", "/", "etc/x", "/etc/", "/etc//x", "/etc/./x", "/../x"] {
            assert!(!is_safe_image_path(bad), "{bad}");
        }
    }
}
