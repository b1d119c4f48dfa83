//! The one narrow path for privileged host steps.
//!
//! `bangerd` runs as the user; creating bridges and taps, writing nft rules and turning on forwarding need
//! root. Every such step goes through [`PrivilegedRunner`], which runs it directly when the process is already
//! root and through `sudo -n` (never prompting) otherwise. Each step carries a short human name (`op`)
//! and is logged with tracing before it runs and when it fails, so the log reads as a list of what banger
//! did to the host. Reads that need no privilege (`ip -j addr show`, `/proc/sys`) use [`query`] and stay
//! out of sudo.
//!
//! Taps are the one step that is not a command when running as root: they are made with ioctls on
//! `/dev/net/tun` (see `tun.rs`), because the tap must be owned by the user and persist after we close the
//! fd. Via sudo the equivalent `ip tuntap add ... user UID` is used.

use std::borrow::Cow;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

use banger_hint::{Hint, Report};
use nix::unistd::{geteuid, Uid};

use crate::names::TapName;
use crate::tun;

/// How privileged steps are run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Elevation {
    /// Already root: run commands and ioctls directly.
    Direct,
    /// Not root: prefix commands with `sudo -n`.
    Sudo,
}

#[derive(Debug, thiserror::Error)]
pub enum PrivilegedError {
    #[error("{op}: could not start `{command}`")]
    Spawn {
        op: &'static str,
        command: String,
        hint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: `{command}` failed ({status}): {stderr}")]
    Failed {
        op: &'static str,
        command: String,
        status: String,
        stderr: String,
        hint: String,
    },
    #[error("{op}: could not write {path}")]
    Write {
        op: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{op}: creating tap {tap} failed")]
    Tun {
        op: &'static str,
        tap: TapName,
        hint: &'static str,
        #[source]
        source: tun::TunError,
    },
}

impl Hint for PrivilegedError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            PrivilegedError::Spawn { hint, .. } | PrivilegedError::Failed { hint, .. } => {
                Some(hint.as_str().into())
            }
            PrivilegedError::Write { .. } => {
                Some("banger needs root (or passwordless sudo) for this step".into())
            }
            PrivilegedError::Tun { hint, .. } => Some((*hint).into()),
        }
    }
}

/// Runs privileged host steps, directly or through `sudo -n`. Cheap to clone.
#[derive(Debug, Clone)]
pub struct PrivilegedRunner {
    elevation: Elevation,
}

impl PrivilegedRunner {
    /// Direct when the effective uid is 0, sudo otherwise.
    pub fn detect() -> Self {
        let elevation = if geteuid().is_root() {
            Elevation::Direct
        } else {
            Elevation::Sudo
        };
        PrivilegedRunner { elevation }
    }

    /// A fixed mode; tests use it to exercise the sudo path while root.
    pub fn with_elevation(elevation: Elevation) -> Self {
        PrivilegedRunner { elevation }
    }

    pub fn elevation(&self) -> Elevation {
        self.elevation
    }

    /// Runs `argv` (program first) as root, feeding `stdin` if given; returns stdout.
    pub fn run(
        &self,
        op: &'static str,
        argv: &[&str],
        stdin: Option<&[u8]>,
    ) -> Result<String, PrivilegedError> {
        let full: Vec<&str> = match self.elevation {
            Elevation::Direct => argv.to_vec(),
            Elevation::Sudo => ["sudo", "-n", "--"].iter().chain(argv).copied().collect(),
        };
        tracing::info!(op, command = %full.join(" "), "privileged host step");
        let result = execute(op, &full, stdin);
        if let Err(err) = &result {
            tracing::warn!(op, error = %Report::new(err, &[crate::HINTS]), "privileged host step failed");
        }
        result
    }

    /// Writes `contents` to a root-owned file such as a `/proc/sys` knob.
    pub fn write_file(
        &self,
        op: &'static str,
        path: &Path,
        contents: &str,
    ) -> Result<(), PrivilegedError> {
        match self.elevation {
            Elevation::Direct => {
                tracing::info!(op, path = %path.display(), contents, "privileged host step");
                std::fs::write(path, contents).map_err(|source| {
                    tracing::warn!(op, error = %source, "privileged host step failed");
                    PrivilegedError::Write {
                        op,
                        path: path.display().to_string(),
                        source,
                    }
                })
            }
            Elevation::Sudo => {
                let path = path.to_string_lossy();
                self.run(op, &["tee", &path], Some(contents.as_bytes()))
                    .map(drop)
            }
        }
    }

    /// Creates a persistent tap owned by `owner`, so an unprivileged VMM running as that user can open it.
    /// If the tap already exists it is re-owned rather than recreated.
    pub fn create_tap(
        &self,
        op: &'static str,
        tap: &TapName,
        owner: Uid,
    ) -> Result<(), PrivilegedError> {
        match self.elevation {
            Elevation::Direct => {
                tracing::info!(op, %tap, owner = owner.as_raw(), "privileged host step: tap ioctls");
                tun::create_persistent_tap(tap.as_str(), owner).map_err(|source| {
                    tracing::warn!(op, error = %source, "privileged host step failed");
                    PrivilegedError::Tun {
                        op,
                        tap: tap.clone(),
                        hint: source.hint(),
                        source,
                    }
                })
            }
            Elevation::Sudo => {
                let uid = owner.as_raw().to_string();
                let argv = [
                    "ip",
                    "tuntap",
                    "add",
                    "dev",
                    tap.as_str(),
                    "mode",
                    "tap",
                    "user",
                    &uid,
                ];
                self.run(op, &argv, None).map(drop)
            }
        }
    }
}

/// Runs a read-only command as the current user (no sudo); returns stdout.
pub fn query(op: &'static str, argv: &[&str]) -> Result<String, PrivilegedError> {
    tracing::debug!(op, command = %argv.join(" "), "host query");
    execute(op, argv, None)
}

fn execute(
    op: &'static str,
    argv: &[&str],
    stdin: Option<&[u8]>,
) -> Result<String, PrivilegedError> {
    let command = argv.join(" ");
    let (program, args) = match argv.split_first() {
        Some(split) => split,
        None => {
            return Err(PrivilegedError::Spawn {
                op,
                command,
                hint: "this is a bug in banger: empty command".to_owned(),
                source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
            })
        }
    };
    let spawn_error = |source: std::io::Error| PrivilegedError::Spawn {
        op,
        command: command.clone(),
        hint: if source.kind() == std::io::ErrorKind::NotFound {
            format!("`{program}` is not installed or not on PATH; install it (iproute2, nftables, sudo)")
        } else {
            format!("check that `{program}` is executable")
        },
        source,
    };
    let mut child = Command::new(program)
        .args(args)
        // Stable, parseable messages regardless of the user's locale.
        .env("LC_ALL", "C")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(spawn_error)?;
    if let (Some(input), Some(mut pipe)) = (stdin, child.stdin.take()) {
        // Inputs are a few hundred bytes, well under a pipe buffer, so writing before reading cannot
        // deadlock; a write error surfaces as the command's own failure below.
        let _ = pipe.write_all(input);
    }
    let output = child.wait_with_output().map_err(spawn_error)?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr).trim().to_owned();
    let hint = if argv.first() == Some(&"sudo") && stderr.contains("password") {
        format!(
            "bangerd is not root and `sudo -n` needs a password; allow passwordless sudo for `{}` for \
             uid {}, or run bangerd as root",
            args.get(2).copied().unwrap_or_default(),
            geteuid()
        )
    } else {
        format!("run `{command}` by hand to see the problem")
    };
    Err(PrivilegedError::Failed {
        op,
        command,
        status: output.status.to_string(),
        stderr,
        hint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_returns_stdout() {
        assert_eq!(query("echo", &["echo", "hi"]).unwrap(), "hi\n");
    }

    #[test]
    fn failures_carry_op_command_stderr_and_hint() {
        let err = PrivilegedRunner::with_elevation(Elevation::Direct)
            .run("list nothing", &["sh", "-c", "echo boom >&2; exit 3"], None)
            .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("list nothing: `sh -c"), "{msg}");
        assert!(msg.contains("boom"), "{msg}");
        assert!(msg.contains("exit status: 3"), "{msg}");
        assert!(!msg.contains("hint"), "{msg}");
        assert!(err.hint().unwrap().contains("by hand"), "{err:?}");
    }

    #[test]
    fn stdin_is_fed_to_the_command() {
        let out = PrivilegedRunner::with_elevation(Elevation::Direct)
            .run("cat", &["cat"], Some(b"table inet banger\n"))
            .unwrap();
        assert_eq!(out, "table inet banger\n");
    }

    #[test]
    fn missing_program_says_what_to_install() {
        let err = query("probe", &["banger-no-such-program"]).unwrap_err();
        assert!(matches!(err, PrivilegedError::Spawn { .. }));
        assert!(err.hint().unwrap().contains("not installed"), "{err}");
    }
}
