//! The image's runtime configuration as the agent sees it: `/banger/image.json`, which the
//! daemon puts into the per-VM initramfs of images without an init system (OCI images).
//!
//! It is the subset of the OCI image config banger uses (`env`, `working_dir`, `user`,
//! `entrypoint`, `cmd`), written by the daemon from the image it pulled. Unknown fields are
//! ignored so a newer daemon can add some; the sizes are bounded here again because a bad
//! file must not keep the agent from serving. What the agent makes of it — the environment and
//! the working directory commands start with — is decided here too, following Docker where
//! users would expect it to.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer};

/// Where the agent, as `/init`, finds the file in the initramfs.
pub const IMAGE_JSON_PATH: &str = "/banger/image.json";
/// Largest `image.json` read.
pub const MAX_IMAGE_JSON: u64 = 1 << 20;
/// Most environment entries used.
pub const MAX_ENV: usize = 1024;
/// Longest environment entry used.
pub const MAX_ENV_ENTRY: usize = 32 << 10;
/// Docker's PATH for images that set none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Where commands start and `HOME` points unless the image says otherwise: the work disk.
pub const DEFAULT_HOME: &str = "/root";

/// The runtime part of an image config.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(default)]
pub struct ImageRuntime {
    /// `KEY=VALUE` entries, in the image's order.
    #[serde(deserialize_with = "null_as_empty")]
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub entrypoint: Vec<String>,
    #[serde(deserialize_with = "null_as_empty")]
    pub cmd: Vec<String>,
}

/// Image configs write `null` for empty lists.
fn null_as_empty<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    Ok(Option::<Vec<String>>::deserialize(d)?.unwrap_or_default())
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} is larger than {MAX_IMAGE_JSON} bytes")]
    TooLarge { path: PathBuf },
    #[error("{path} is not an image configuration")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// Reads the file at `path`; `Ok(None)` when there is none (a guest booted without one).
pub fn read(path: &Path) -> Result<Option<ImageRuntime>, ImageError> {
    let read_err = |source| ImageError::Read {
        path: path.to_owned(),
        source,
    };
    let file = match fs_err::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(read_err(e)),
    };
    let mut data = Vec::new();
    file.take(MAX_IMAGE_JSON + 1)
        .read_to_end(&mut data)
        .map_err(read_err)?;
    if data.len() as u64 > MAX_IMAGE_JSON {
        return Err(ImageError::TooLarge {
            path: path.to_owned(),
        });
    }
    serde_json::from_slice(&data)
        .map(Some)
        .map_err(|source| ImageError::Parse {
            path: path.to_owned(),
            source,
        })
}

impl ImageRuntime {
    /// The environment commands start from: the image's `env` (a later entry for the same
    /// key wins, as in Docker), then `PATH` when the image sets none. Entries
    /// that are not `KEY=VALUE`, or past the size bounds, are skipped with a warning each.
    pub fn base_env(&self) -> (Vec<(String, String)>, Vec<String>) {
        let mut env: Vec<(String, String)> = Vec::new();
        let mut warnings = Vec::new();
        for (i, entry) in self.env.iter().enumerate() {
            if i >= MAX_ENV {
                warnings.push(format!(
                    "env: only the first {MAX_ENV} of {} entries are used",
                    self.env.len()
                ));
                break;
            }
            let short: String = entry.chars().take(40).collect();
            if entry.len() > MAX_ENV_ENTRY {
                warnings.push(format!(
                    "env: skipping {short:?}...: longer than {MAX_ENV_ENTRY} bytes"
                ));
                continue;
            }
            let Some((key, value)) = entry.split_once('=') else {
                warnings.push(format!("env: skipping {short:?}: not KEY=VALUE"));
                continue;
            };
            if key.is_empty() || entry.contains('\0') {
                warnings.push(format!("env: skipping {short:?}: not KEY=VALUE"));
                continue;
            }
            match env.iter_mut().find(|(k, _)| k == key) {
                Some(slot) => slot.1 = value.to_owned(),
                None => env.push((key.to_owned(), value.to_owned())),
            }
        }
        // HOME is left to the command's user (its passwd entry, else /root) unless set here.
        if !env.iter().any(|(k, _)| k == "PATH") {
            env.push(("PATH".to_owned(), DEFAULT_PATH.to_owned()));
        }
        (env, warnings)
    }

    /// Where commands start when the request names no directory: the image's `working_dir`
    /// (relative ones are taken from `/`, as Docker does), else [`DEFAULT_HOME`].
    pub fn default_cwd(&self) -> PathBuf {
        match self.working_dir.as_deref().map(str::trim) {
            Some(dir) if !dir.is_empty() => Path::new("/").join(dir),
            _ => PathBuf::from(DEFAULT_HOME),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(env: &[(String, String)]) -> Vec<String> {
        env.iter().map(|(k, v)| format!("{k}={v}")).collect()
    }

    #[test]
    fn the_daemons_json_is_read_and_unknown_fields_ignored() {
        let json = r#"{"env":["A=1"],"working_dir":"/app","user":"1000:1000",
                       "entrypoint":null,"cmd":["sh"],"labels":{"x":"y"}}"#;
        let r: ImageRuntime = serde_json::from_str(json).unwrap();
        assert_eq!(
            r,
            ImageRuntime {
                env: vec!["A=1".into()],
                working_dir: Some("/app".into()),
                user: Some("1000:1000".into()),
                entrypoint: vec![],
                cmd: vec!["sh".into()],
            }
        );
        assert_eq!(
            serde_json::from_str::<ImageRuntime>("{}").unwrap(),
            ImageRuntime::default()
        );
    }

    #[test]
    fn env_gets_path_and_home_only_when_the_image_sets_none() {
        let r = ImageRuntime {
            env: vec![
                "LANG=C.UTF-8".into(),
                "X=a=b".into(),
                "X=c".into(),
                "EMPTY=".into(),
            ],
            ..Default::default()
        };
        let (env, warnings) = r.base_env();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(
            pairs(&env),
            [
                "LANG=C.UTF-8",
                "X=c",
                "EMPTY=",
                &format!("PATH={DEFAULT_PATH}"),
            ]
        );
        let r = ImageRuntime {
            env: vec!["PATH=/opt/bin".into(), "HOME=/home/app".into()],
            ..Default::default()
        };
        assert_eq!(pairs(&r.base_env().0), ["PATH=/opt/bin", "HOME=/home/app"]);
    }

    #[test]
    fn bad_env_entries_are_skipped_with_warnings() {
        let mut env = vec![
            "NOEQUALS".into(),
            "=v".into(),
            "A=x\0y".into(),
            format!("B={}", "x".repeat(MAX_ENV_ENTRY)),
        ];
        env.extend((0..MAX_ENV).map(|i| format!("K{i}=v")));
        let r = ImageRuntime {
            env,
            ..Default::default()
        };
        let (env, warnings) = r.base_env();
        assert_eq!(warnings.len(), 5, "{warnings:?}");
        assert!(warnings[4].contains("only the first 1024"), "{warnings:?}");
        assert_eq!(env.len(), MAX_ENV - 4 + 1);
        assert!(!env
            .iter()
            .any(|(k, _)| k.is_empty() || k == "A" || k == "B"));
    }

    #[test]
    fn working_dir_defaults_to_root_and_relative_ones_start_at_slash() {
        let cwd = |d: Option<&str>| {
            ImageRuntime {
                working_dir: d.map(str::to_owned),
                ..Default::default()
            }
            .default_cwd()
        };
        assert_eq!(cwd(None), Path::new("/root"));
        assert_eq!(cwd(Some("")), Path::new("/root"));
        assert_eq!(cwd(Some("/srv/app")), Path::new("/srv/app"));
        assert_eq!(cwd(Some("app")), Path::new("/app"));
    }

    #[test]
    fn files_are_optional_bounded_and_must_parse() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.json");
        assert_eq!(read(&path).unwrap(), None);
        std::fs::write(&path, br#"{"env":["A=1"]}"#).unwrap();
        assert_eq!(read(&path).unwrap().unwrap().env, ["A=1"]);
        std::fs::write(&path, b"{not json").unwrap();
        let err = read(&path).unwrap_err();
        assert!(
            err.to_string().contains("is not an image configuration"),
            "{err}"
        );
        std::fs::write(&path, vec![b' '; MAX_IMAGE_JSON as usize + 1]).unwrap();
        assert!(matches!(read(&path), Err(ImageError::TooLarge { .. })));
    }
}
