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

/// An error ready to print: message, its hints (one `hint:` line each), and the exit status it
/// maps to.
#[derive(Debug)]
pub struct CliError {
    pub exit: Exit,
    pub message: String,
    pub hints: Vec<String>,
}

impl CliError {
    pub fn new(exit: Exit, message: impl Into<String>) -> Self {
        Self {
            exit,
            message: message.into(),
            hints: Vec::new(),
        }
    }

    /// Adds a hint after those already there.
    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hints.push(hint.into());
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
            hints: e.hints,
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
        // Messages may quote a guest's console: never let it drive the terminal.
        write!(f, "error: {}", crate::safe_text::printable(&self.message))?;
        for h in &self.hints {
            write!(f, "\nhint: {}", crate::safe_text::printable(h))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_hint_of_a_daemon_error_gets_its_own_line() {
        let api = ApiError::new(ErrorCode::VmmFailed, "VM web failed to start: boom")
            .with_hint("see `banger vm logs web`")
            .with_hint("console log: /run/web/console.log");
        let e = CliError::from_api(api);
        assert_eq!(e.exit, Exit::VmFailed);
        assert_eq!(
            e.to_string(),
            "error: VM web failed to start: boom\n\
             hint: see `banger vm logs web`\n\
             hint: console log: /run/web/console.log"
        );
        let bare = CliError::new(Exit::Failure, "nope");
        assert_eq!(bare.to_string(), "error: nope");
    }
}
