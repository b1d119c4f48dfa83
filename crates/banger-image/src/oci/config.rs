//! [`ImageRuntime`]: the part of an OCI image config that banger uses to run commands in the
//! guest (`Env`, `WorkingDir`, `User`, `Entrypoint`, `Cmd`), taken from the untrusted config
//! blob with bounds, and checked again by [`ImageRuntime::validate`] wherever it is read back
//! (the agent reads it from the initramfs as JSON).
//!
//! Platform, rootfs and diff_id checks of the same blob live in `manifest`; this module only
//! owns the runtime subset.

use serde::{Deserialize, Serialize};

/// At most this many `Env` entries.
pub const ENV_MAX: usize = 1024;
/// At most this many bytes in one `Env` entry, `Entrypoint` or `Cmd` argument.
pub const ENTRY_MAX_BYTES: usize = 32 << 10;
/// At most this many `Entrypoint` or `Cmd` arguments.
pub const ARGS_MAX: usize = 1024;
/// At most this many bytes in `WorkingDir` or `User`.
pub const SHORT_MAX_BYTES: usize = 4096;

/// How the image wants its commands run: the config's `Env` ("K=V"), `WorkingDir`, `User`
/// (`name`, `uid`, `uid:gid`, ...; resolved in the guest), `Entrypoint` and `Cmd`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageRuntime {
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
}

/// A config whose runtime part banger refuses.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("the image config has {count} Env entries; banger accepts at most {max}")]
    TooManyEnv { count: usize, max: usize },
    #[error("the image config's {field} has {count} entries; banger accepts at most {max}")]
    TooManyArgs {
        field: &'static str,
        count: usize,
        max: usize,
    },
    #[error(
        "entry {index} of the image config's {field} is {len} bytes; banger accepts at most {max}"
    )]
    TooLong {
        field: &'static str,
        index: usize,
        len: usize,
        max: usize,
    },
    #[error("Env entry {index} of the image config (`{entry}`) is not NAME=VALUE")]
    EnvNotAssignment { index: usize, entry: String },
    #[error("entry {index} of the image config's {field} contains a NUL byte")]
    Nul { field: &'static str, index: usize },
}

impl ImageRuntime {
    /// The runtime subset of a parsed config (`None` when the config has no `config` object).
    /// Empty `WorkingDir` and `User` mean "not set", as in Docker.
    pub fn from_config(config: Option<&oci_spec::image::Config>) -> Result<Self, ConfigError> {
        let Some(c) = config else {
            return Ok(ImageRuntime::default());
        };
        let non_empty = |s: &Option<String>| s.as_ref().filter(|s| !s.is_empty()).cloned();
        let rt = ImageRuntime {
            env: c.env().clone().unwrap_or_default(),
            working_dir: non_empty(c.working_dir()),
            user: non_empty(c.user()),
            entrypoint: c.entrypoint().clone().unwrap_or_default(),
            cmd: c.cmd().clone().unwrap_or_default(),
        };
        rt.validate()?;
        Ok(rt)
    }

    /// Checks the bounds and shapes listed in the module constants.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.env.len() > ENV_MAX {
            return Err(ConfigError::TooManyEnv {
                count: self.env.len(),
                max: ENV_MAX,
            });
        }
        check_list("Env", &self.env, ENTRY_MAX_BYTES)?;
        for (index, e) in self.env.iter().enumerate() {
            if !matches!(e.split_once('='), Some((name, _)) if !name.is_empty()) {
                return Err(ConfigError::EnvNotAssignment {
                    index,
                    entry: crate::oci::reference::shorten(e),
                });
            }
        }
        for (field, args) in [("Entrypoint", &self.entrypoint), ("Cmd", &self.cmd)] {
            if args.len() > ARGS_MAX {
                return Err(ConfigError::TooManyArgs {
                    field,
                    count: args.len(),
                    max: ARGS_MAX,
                });
            }
            check_list(field, args, ENTRY_MAX_BYTES)?;
        }
        for (field, value) in [("WorkingDir", &self.working_dir), ("User", &self.user)] {
            if let Some(v) = value {
                check_list(field, std::slice::from_ref(v), SHORT_MAX_BYTES)?;
            }
        }
        Ok(())
    }
}

fn check_list(field: &'static str, items: &[String], max: usize) -> Result<(), ConfigError> {
    for (index, s) in items.iter().enumerate() {
        if s.len() > max {
            return Err(ConfigError::TooLong {
                field,
                index,
                len: s.len(),
                max,
            });
        }
        // A NUL cannot reach execve or the environment block; refuse it here, not in the guest.
        if s.contains('\0') {
            return Err(ConfigError::Nul { field, index });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<ImageRuntime, ConfigError> {
        let cfg: oci_spec::image::ImageConfiguration = serde_json::from_str(json).unwrap();
        ImageRuntime::from_config(cfg.config().as_ref())
    }

    fn config_with(inner: &str) -> String {
        format!(
            r#"{{"architecture":"amd64","os":"linux","rootfs":{{"type":"layers","diff_ids":[]}},"config":{inner}}}"#
        )
    }

    #[test]
    fn runtime_fields_are_taken_from_a_docker_style_config() {
        let rt = parse(&config_with(
            r#"{"Env":["PATH=/usr/bin:/bin","EMPTY="],"WorkingDir":"/app","User":"1000:1000",
                "Entrypoint":["/entry.sh"],"Cmd":["serve","--port","80"],
                "ExposedPorts":{"80/tcp":{}},"Labels":{"a":"b"},"Volumes":null}"#,
        ))
        .unwrap();
        assert_eq!(
            rt,
            ImageRuntime {
                env: vec!["PATH=/usr/bin:/bin".into(), "EMPTY=".into()],
                working_dir: Some("/app".into()),
                user: Some("1000:1000".into()),
                entrypoint: vec!["/entry.sh".into()],
                cmd: vec!["serve".into(), "--port".into(), "80".into()],
            }
        );
        let json = serde_json::to_string(&rt).unwrap();
        assert_eq!(serde_json::from_str::<ImageRuntime>(&json).unwrap(), rt);
    }

    #[test]
    fn missing_null_and_empty_fields_mean_unset() {
        let none: oci_spec::image::ImageConfiguration = serde_json::from_str(
            r#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#,
        )
        .unwrap();
        assert_eq!(
            ImageRuntime::from_config(none.config().as_ref()).unwrap(),
            ImageRuntime::default()
        );
        let rt = parse(&config_with(
            r#"{"Env":null,"Cmd":null,"Entrypoint":null,"WorkingDir":"","User":""}"#,
        ))
        .unwrap();
        assert_eq!(rt, ImageRuntime::default());
    }

    #[test]
    fn hostile_runtime_values_are_refused() {
        let many: Vec<String> = (0..=ENV_MAX).map(|i| format!("\"V{i}=x\"")).collect();
        let long = format!("\"A={}\"", "x".repeat(ENTRY_MAX_BYTES));
        let many_args: Vec<String> = (0..=ARGS_MAX).map(|_| "\"a\"".to_string()).collect();
        let cases = [
            (
                format!(r#"{{"Env":[{}]}}"#, many.join(",")),
                "1025 Env entries",
            ),
            (
                format!(r#"{{"Env":[{long}]}}"#),
                "entry 0 of the image config's Env is 32770 bytes",
            ),
            (r#"{"Env":["PATH"]}"#.to_string(), "is not NAME=VALUE"),
            (r#"{"Env":["=x"]}"#.to_string(), "is not NAME=VALUE"),
            (
                r#"{"Env":["A=1","B=\u0000"]}"#.to_string(),
                "entry 1 of the image config's Env contains a NUL",
            ),
            (
                r#"{"Cmd":["sh","-c\u0000"]}"#.to_string(),
                "Cmd contains a NUL",
            ),
            (
                format!(r#"{{"Entrypoint":[{}]}}"#, many_args.join(",")),
                "Entrypoint has 1025 entries",
            ),
            (
                format!(r#"{{"WorkingDir":"/{}"}}"#, "d".repeat(SHORT_MAX_BYTES)),
                "WorkingDir is 4097 bytes",
            ),
            (r#"{"User":"a\u0000b"}"#.to_string(), "User contains a NUL"),
        ];
        for (inner, want) in cases {
            let err = parse(&config_with(&inner)).unwrap_err();
            assert!(err.to_string().contains(want), "{want}: {err}");
        }
    }

    #[test]
    fn read_back_json_is_validated_and_strict() {
        let bad = ImageRuntime {
            env: vec!["novalue".into()],
            ..Default::default()
        };
        assert!(bad.validate().is_err());
        assert!(serde_json::from_str::<ImageRuntime>(
            r#"{"env":[],"working_dir":null,"user":null,"entrypoint":[],"cmd":[],"extra":1}"#
        )
        .is_err());
    }
}
