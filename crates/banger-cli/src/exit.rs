//! banger's own exit statuses and the error type that carries them to `main`.
//!
//! Commands run inside a VM (`vm run -- cmd`, `vm exec`, `vm ssh -- cmd`) exit with the command's
//! status; banger's own failures use the statuses below, chosen from the range shells and ssh
//! leave alone (ssh uses 255, shells 126-128+n), so a script can tell them apart. They are
//! documented in `banger --help` and docs/exit-codes.md; keep the three in sync.

use banger_api::{ApiError, ErrorCode};

/// banger's own failures. The numeric values are part of the public interface.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// Generic failure not covered below.
    Failure = 1,
    /// Bad command line or bad config file.
    Usage = 2,
    /// The daemon could not be started or reached, or speaks another API version.
    DaemonUnreachable = 69,
    /// The named image, kernel or VM does not exist.
    NotFound = 70,
    /// A download, build or verification of an image failed.
    ImageFailed = 71,
    /// The VM could not be created or started.
    VmFailed = 72,
    /// The VM started but did not become reachable in time.
    BootTimeout = 73,
}

pub const EXIT_CODES_HELP: &str = "\
Exit status:
  0    success (or, for commands run in a VM, the command's own status)
  1    failure not covered below
  2    bad usage or invalid config file
  3    `banger daemon status` only: the daemon is not running
  69   bangerd could not be started or reached, or speaks another API version
  70   the named image, kernel or VM does not exist
  71   an image download, build or verification failed
  72   the VM could not be created or started
  73   the VM did not become reachable in time";

/// An error ready to print: message, optional hint, and the exit status it maps to.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub hint: Option<String>,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            hint: None,
        }
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    pub fn from_api(e: ApiError) -> Self {
        let exit = match e.code {
            ErrorCode::ApiVersionMismatch => Exit::DaemonUnreachable,
            ErrorCode::BadRequest => Exit::Usage,
            ErrorCode::NotFound => Exit::NotFound,
            ErrorCode::MissingTool
            | ErrorCode::DigestMismatch
            | ErrorCode::Download
            | ErrorCode::DiskFull
            | ErrorCode::BuildFailed => Exit::ImageFailed,
            ErrorCode::NoFreeAddress | ErrorCode::VmmFailed => Exit::VmFailed,
            ErrorCode::BootTimeout => Exit::BootTimeout,
            ErrorCode::AlreadyExists
            | ErrorCode::InUse
            | ErrorCode::InvalidState
            | ErrorCode::Internal => Exit::Failure,
        };
        Self {
            exit,
            message: e.message,
            hint: e.hint,
        }
    }
}

impl From<banger_config::ConfigError> for CliError {
    fn from(e: banger_config::ConfigError) -> Self {
        CliError::new(Exit::Usage, e.to_string())
    }
}

impl std::fmt::Display for CliError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "error: {}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\nhint: {h}")?;
        }
        Ok(())
    }
}
