//! Shell completion: subcommands and flags come from the clap definition; VM, image and kernel
//! names come live from the daemon. Completion never starts a daemon: when none answers (or it
//! is slow), names complete to nothing, and name arguments never fall back to file names.

use std::time::Duration;

use clap_complete::CompletionCandidate;
use hyper::Method;

use crate::client::Client;

fn names(path: &'static str) -> Vec<CompletionCandidate> {
    let Ok(paths) = banger_config::Paths::from_env() else {
        return Vec::new();
    };
    let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    rt.block_on(async {
        let client = Client::existing(&paths);
        let call = client.call::<Vec<serde_json::Value>>(Method::GET, path, None::<&()>);
        match tokio::time::timeout(Duration::from_secs(2), call).await {
            Ok(Ok(items)) => items
                .iter()
                .filter_map(|i| {
                    i["name"]
                        .as_str()
                        .map(|n| CompletionCandidate::new(n.to_owned()))
                })
                .collect(),
            _ => Vec::new(),
        }
    })
}

pub fn vms() -> Vec<CompletionCandidate> {
    names("/v1/vms")
}

pub fn images() -> Vec<CompletionCandidate> {
    names("/v1/images")
}

pub fn kernels() -> Vec<CompletionCandidate> {
    names("/v1/kernels")
}

pub const LOADING_HELP: &str = "\
Loading completions (they call back into banger, so load them anew in each shell):
  bash:        echo 'source <(banger completion bash)' >> ~/.bashrc
  zsh:         echo 'source <(banger completion zsh)' >> ~/.zshrc
  fish:        echo 'banger completion fish | source' >> ~/.config/fish/config.fish
  powershell:  Add-Content $PROFILE 'banger completion powershell | Out-String | Invoke-Expression'
VM, image and kernel names are asked from the running daemon; with the daemon stopped they
complete to nothing.";

/// Prints the registration script for `shell` (the same one `COMPLETE=shell banger` prints).
pub fn print_script(shell: &str) -> Result<std::process::ExitCode, crate::exit::CliError> {
    use crate::exit::{CliError, Exit};
    let exe = std::env::current_exe()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot find banger's own path: {e}")))?;
    let out = std::process::Command::new(&exe)
        .env("COMPLETE", shell)
        .output()
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot run {}: {e}", exe.display())))?;
    if !out.status.success() || out.stdout.is_empty() {
        return Err(CliError::new(
            Exit::Usage,
            format!("cannot generate completions for {shell:?}"),
        )
        .hint("supported shells: bash, zsh, fish, powershell"));
    }
    use std::io::Write;
    let _ = std::io::stdout().write_all(&out.stdout);
    Ok(std::process::ExitCode::SUCCESS)
}
