//! The image catalog: which image names exist and where each comes from.
//!
//! A catalog is TOML with one `[[image]]` table per name. `kind = "recipe"` images are built locally
//! from a built-in recipe; `kind = "bundle"` images are pulled from a bundle manifest URL, optionally
//! pinned by the manifest's SHA-256. The built-in catalog (`images/catalog.toml`) is compiled in;
//! config may point at another one by path or URL ([`Catalog::load`]), whose relative manifest URLs
//! are resolved against the catalog's own location. Deciding which catalog to use is the daemon's job.

use crate::digest::Sha256Digest;
use crate::download::{fetch_small, parse_location, DownloadError};
use crate::recipe;
use banger_hint::Hint;
use reqwest::Url;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashSet;

const BUILTIN: &str = include_str!("../../../images/catalog.toml");
const CATALOG_MAX_BYTES: u64 = 4 << 20;

/// Where an image comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Built locally by the named built-in recipe.
    Recipe { recipe: String },
    /// Pulled from a bundle; `manifest_url` is absolute (http, https or file).
    Bundle {
        manifest_url: String,
        manifest_sha256: Option<Sha256Digest>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub name: String,
    pub description: String,
    pub source: Source,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Catalog {
    entries: Vec<Entry>,
}

/// Lookup of a name the catalog does not have.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown image `{name}`; the catalog has: {}", known.join(", "))]
pub struct UnknownImage {
    pub name: String,
    pub known: Vec<String>,
}

impl Hint for UnknownImage {
    fn hint(&self) -> Option<Cow<'_, str>> {
        Some("`banger image list` shows every image".into())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("catalog {location} is not valid")]
    Toml {
        location: String,
        #[source]
        source: toml::de::Error,
    },
    #[error("catalog {location}: image `{name}`: {problem}")]
    Invalid {
        location: String,
        name: String,
        problem: String,
    },
    #[error("could not read catalog {location}")]
    Fetch {
        location: String,
        #[source]
        source: Box<DownloadError>,
    },
    #[error("catalog {location} is not UTF-8 text")]
    NotText { location: String },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    image: Vec<RawEntry>,
}

#[derive(Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Kind {
    Recipe,
    Bundle,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    name: String,
    kind: Kind,
    #[serde(default)]
    description: String,
    recipe: Option<String>,
    manifest_url: Option<String>,
    manifest_sha256: Option<Sha256Digest>,
}

impl Catalog {
    /// The catalog compiled into banger.
    pub fn builtin() -> Catalog {
        // Checked by a unit test, so a broken built-in catalog cannot ship.
        Catalog::parse_at(BUILTIN, "(built-in)", None).unwrap_or(Catalog {
            entries: Vec::new(),
        })
    }

    /// Parses catalog text; bundle manifest URLs must then be absolute URLs or paths.
    pub fn parse(text: &str) -> Result<Catalog, CatalogError> {
        Catalog::parse_at(text, "(inline)", None)
    }

    /// Reads a catalog from a file path, `file://`, `http://` or `https://` location.
    pub async fn load(location: &str) -> Result<Catalog, CatalogError> {
        let fetch_err = |source| CatalogError::Fetch {
            location: location.to_owned(),
            source: Box::new(source),
        };
        let url = parse_location(location).map_err(fetch_err)?;
        let bytes = fetch_small(&url, CATALOG_MAX_BYTES)
            .await
            .map_err(fetch_err)?;
        let text = String::from_utf8(bytes).map_err(|_| CatalogError::NotText {
            location: location.to_owned(),
        })?;
        Catalog::parse_at(&text, location, Some(&url))
    }

    fn parse_at(text: &str, location: &str, base: Option<&Url>) -> Result<Catalog, CatalogError> {
        let raw: RawCatalog = toml::from_str(text).map_err(|source| CatalogError::Toml {
            location: location.to_owned(),
            source,
        })?;
        let mut seen = HashSet::new();
        let mut entries = Vec::with_capacity(raw.image.len());
        for e in raw.image {
            let invalid = |problem: String| CatalogError::Invalid {
                location: location.to_owned(),
                name: e.name.clone(),
                problem,
            };
            if !is_image_name(&e.name) {
                return Err(invalid(
                    "names are lowercase letters, digits, '-', '_' or '.'".into(),
                ));
            }
            if !seen.insert(e.name.clone()) {
                return Err(invalid("is listed twice".into()));
            }
            let source = match (e.kind, &e.recipe, &e.manifest_url) {
                (Kind::Recipe, Some(r), None) if e.manifest_sha256.is_none() => {
                    if recipe::builtin(r).is_none() {
                        return Err(invalid(format!(
                            "recipe `{r}` is not built in; built-in recipes: {}",
                            recipe::builtin_names().join(", ")
                        )));
                    }
                    Source::Recipe { recipe: r.clone() }
                }
                (Kind::Recipe, ..) => {
                    return Err(invalid(
                        "kind = \"recipe\" needs `recipe` and no manifest fields".into(),
                    ))
                }
                (Kind::Bundle, None, Some(u)) => Source::Bundle {
                    manifest_url: resolve(u, base).map_err(invalid)?,
                    manifest_sha256: e.manifest_sha256,
                },
                (Kind::Bundle, ..) => {
                    return Err(invalid(
                        "kind = \"bundle\" needs `manifest_url` and no `recipe`".into(),
                    ))
                }
            };
            entries.push(Entry {
                name: e.name,
                description: e.description,
                source,
            });
        }
        Ok(Catalog { entries })
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn names(&self) -> Vec<String> {
        self.entries.iter().map(|e| e.name.clone()).collect()
    }

    pub fn lookup(&self, name: &str) -> Result<&Entry, UnknownImage> {
        self.entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| UnknownImage {
                name: name.to_owned(),
                known: self.names(),
            })
    }
}

fn is_image_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c))
}

fn resolve(u: &str, base: Option<&Url>) -> Result<String, String> {
    match parse_location(u) {
        Ok(url) => return Ok(url.to_string()),
        Err(DownloadError::BadUrl(_)) => {}
        Err(e) => return Err(e.to_string()),
    }
    let base = base.ok_or_else(|| {
        format!("manifest_url `{u}` is relative, which only works in a catalog loaded from a file or URL")
    })?;
    let url = base
        .join(u)
        .map_err(|e| format!("manifest_url `{u}` cannot be resolved against {base}: {e}"))?;
    parse_location(url.as_str())
        .map(|u| u.to_string())
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::TestServer;

    #[test]
    fn builtin_catalog_has_both_recipe_images() {
        let parsed = Catalog::parse_at(BUILTIN, "(built-in)", None).unwrap();
        let c = Catalog::builtin();
        assert_eq!(c, parsed);
        assert_eq!(c.names(), ["debian-bookworm", "debian-bookworm-slim"]);
        for name in ["debian-bookworm", "debian-bookworm-slim"] {
            let e = c.lookup(name).unwrap();
            assert_eq!(
                e.source,
                Source::Recipe {
                    recipe: name.into()
                }
            );
            assert!(!e.description.is_empty());
        }
    }

    #[test]
    fn unknown_image_lists_what_exists() {
        let err = Catalog::builtin().lookup("ubuntu").unwrap_err();
        assert_eq!(err.known, ["debian-bookworm", "debian-bookworm-slim"]);
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "unknown image `ubuntu`; the catalog has: debian-bookworm, debian-bookworm-slim"
            ),
            "{msg}"
        );
    }

    #[test]
    fn bundle_entries_parse_with_optional_pin() {
        let digest = Sha256Digest::of_bytes(b"m");
        let c = Catalog::parse(&format!(
            r#"
[[image]]
name = "pinned"
kind = "bundle"
manifest_url = "https://images.example/pinned/manifest.json"
manifest_sha256 = "{digest}"

[[image]]
name = "local"
kind = "bundle"
manifest_url = "/srv/bundles/local/manifest.json"
"#
        ))
        .unwrap();
        assert_eq!(
            c.lookup("pinned").unwrap().source,
            Source::Bundle {
                manifest_url: "https://images.example/pinned/manifest.json".into(),
                manifest_sha256: Some(digest),
            }
        );
        assert_eq!(
            c.lookup("local").unwrap().source,
            Source::Bundle {
                manifest_url: "file:///srv/bundles/local/manifest.json".into(),
                manifest_sha256: None
            }
        );
    }

    #[test]
    fn invalid_catalogs_name_the_image_and_problem() {
        let cases = [
            ("[[image]]\nname = \"x\"\nkind = \"oci\"\n", "unknown variant `oci`"),
            ("[[image]]\nname = \"x\"\nkind = \"recipe\"\nrecipe = \"nope\"\n", "recipe `nope` is not built in"),
            ("[[image]]\nname = \"x\"\nkind = \"recipe\"\n", "needs `recipe`"),
            ("[[image]]\nname = \"x\"\nkind = \"bundle\"\n", "needs `manifest_url`"),
            ("[[image]]\nname = \"x\"\nkind = \"bundle\"\nmanifest_url = \"b/manifest.json\"\n", "is relative"),
            ("[[image]]\nname = \"x\"\nkind = \"bundle\"\nmanifest_url = \"ftp://h/m\"\n", "http://, https:// and file://"),
            ("[[image]]\nname = \"X Y\"\nkind = \"recipe\"\nrecipe = \"debian-bookworm\"\n", "lowercase"),
            ("[[image]]\nname = \"x\"\nkind = \"recipe\"\nrecipe = \"debian-bookworm\"\ncolour = 1\n", "unknown field `colour`"),
            ("[[image]]\nname = \"x\"\nkind = \"bundle\"\nmanifest_url = \"/m\"\nmanifest_sha256 = \"abc\"\n", "64 hex digits"),
        ];
        for (text, want) in cases {
            let err = Catalog::parse(text).unwrap_err();
            let msg = format!(
                "{err}: {}",
                std::error::Error::source(&err)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(msg.contains(want), "{text:?}: {msg}");
        }
        let dup =
            "[[image]]\nname = \"x\"\nkind = \"recipe\"\nrecipe = \"debian-bookworm\"\n".repeat(2);
        assert!(Catalog::parse(&dup)
            .unwrap_err()
            .to_string()
            .contains("`x`: is listed twice"));
    }

    #[tokio::test]
    async fn load_from_path_file_url_and_http_resolves_relative_manifests() {
        let text = "[[image]]\nname = \"b\"\nkind = \"bundle\"\nmanifest_url = \"bundles/b/manifest.json\"\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.toml");
        std::fs::write(&path, text).unwrap();
        let want = Url::from_file_path(dir.path().join("bundles/b/manifest.json"))
            .unwrap()
            .to_string();
        for location in [
            path.display().to_string(),
            Url::from_file_path(&path).unwrap().to_string(),
        ] {
            let c = Catalog::load(&location).await.unwrap();
            assert_eq!(
                c.lookup("b").unwrap().source,
                Source::Bundle {
                    manifest_url: want.clone(),
                    manifest_sha256: None
                }
            );
        }
        let server = TestServer::start().await;
        server.serve("/cat/catalog.toml", text.as_bytes().to_vec());
        let c = Catalog::load(&server.url("/cat/catalog.toml"))
            .await
            .unwrap();
        assert_eq!(
            c.lookup("b").unwrap().source,
            Source::Bundle {
                manifest_url: server.url("/cat/bundles/b/manifest.json"),
                manifest_sha256: None
            }
        );
        let err = Catalog::load(&server.url("/missing.toml"))
            .await
            .unwrap_err();
        let msg = format!("{err}: {}", std::error::Error::source(&err).unwrap());
        assert!(msg.contains("404"), "{msg}");
    }
}
