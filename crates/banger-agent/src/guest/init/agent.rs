//! The agent process PID 1 keeps running: forked from PID 1, it applies the per-boot setup
//! and serves the host channel, exactly as the systemd-started agent does, with what the
//! image's config says about commands (environment, working directory) and a power-off that
//! goes through PID 1.

use std::path::Path;
use std::sync::Arc;

use nix::unistd::{fork, ForkResult, Pid};

use crate::guest::init::mounts::{ensure_dir, DirOutcome};
use crate::guest::init::supervisor::unblock_signals;
use crate::guest::power::InitPower;
use crate::guest::serve::{log, report, ServeConfig};
use crate::guest::{hostname, read_boot_settings, setup, transport, SetupConfig};
use crate::image::ImageRuntime;

/// How commands run in this guest: the image's environment and working directory (Docker's
/// defaults when it has none), power-off through PID 1. Returns warnings about the config.
pub fn serve_config(runtime: Option<&ImageRuntime>) -> (ServeConfig, Vec<String>) {
    let runtime = runtime.cloned().unwrap_or_default();
    let (base_env, warnings) = runtime.base_env();
    let cfg = ServeConfig {
        default_cwd: runtime.default_cwd(),
        base_env,
        power: Arc::new(InitPower),
        // The image's User (OCI syntax), resolved per command against the image's /etc.
        user: runtime.user.clone().filter(|u| !u.trim().is_empty()),
        etc: std::path::PathBuf::from("/etc"),
        identity: Arc::new(crate::guest::identity::SystemIdentity::default()),
    };
    (cfg, warnings)
}

/// Forks the agent; the child never returns from here.
pub fn spawn(runtime: Option<&ImageRuntime>) -> nix::Result<Pid> {
    // SAFETY: PID 1 never starts a thread, so the child of this fork owns a consistent copy of
    // every lock and allocator state and may run any code.
    match unsafe { fork() }? {
        ForkResult::Parent { child } => Ok(child),
        ForkResult::Child => {
            // A panic must end this process, never unwind back into PID 1's loop in the child.
            let outcome = std::panic::catch_unwind(|| run(runtime));
            log(format_args!(
                "agent: stopped after a panic ({:?})",
                outcome.err()
            ));
            std::process::exit(101)
        }
    }
}

/// The agent's life in an init-less guest.
fn run(runtime: Option<&ImageRuntime>) -> ! {
    if let Err(e) = unblock_signals() {
        log(format_args!("agent: cannot reset the signal mask: {e}"));
    }
    // Its own session: commands it starts are not in PID 1's process group.
    let _ = nix::unistd::setsid();
    let settings = read_boot_settings();
    let (cfg, warnings) = serve_config(runtime);
    for w in &warnings {
        log(format_args!("image config: {w}"));
    }
    let setup_cfg = SetupConfig::default();
    // The work disk is mounted on /root, which images may not have.
    dir_step(&setup_cfg.home, 0o700);
    setup(&settings, &setup_cfg);
    match hostname::ensure_localhost(&setup_cfg.etc) {
        Ok(true) => log(format_args!("hosts: localhost added to /etc/hosts")),
        Ok(false) => {}
        Err(e) => log(format_args!("hosts: FAILED: {}", report(&e))),
    }
    // Once the work disk is in place: the working directory may be on it.
    cfg.create_working_dir();
    transport::serve_forever(Arc::new(cfg))
}

fn dir_step(path: &Path, mode: u32) {
    match ensure_dir(path, mode) {
        Ok(DirOutcome::Created) => log(format_args!("{}: created", path.display())),
        Ok(DirOutcome::Existed) => {}
        Err(e) => log(format_args!("{}: FAILED: {}", path.display(), report(&e))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn commands_get_the_images_env_and_working_dir() {
        let runtime = ImageRuntime {
            env: vec!["FOO=bar".into(), "PATH=/bin".into()],
            working_dir: Some("/srv/app".into()),
            ..Default::default()
        };
        let (cfg, warnings) = serve_config(Some(&runtime));
        assert!(warnings.is_empty());
        assert_eq!(cfg.default_cwd, PathBuf::from("/srv/app"));
        assert_eq!(
            cfg.base_env,
            [
                ("FOO".to_string(), "bar".to_string()),
                ("PATH".into(), "/bin".into()),
            ]
        );
    }

    #[test]
    fn without_an_image_config_commands_start_in_root_with_a_default_path() {
        let (cfg, _) = serve_config(None);
        assert_eq!(cfg.default_cwd, PathBuf::from("/root"));
        assert!(cfg
            .base_env
            .iter()
            .any(|(k, v)| k == "PATH" && v.contains("/usr/bin")));
        // HOME is the command's user's (exec decides), not the image's.
        assert!(!cfg.base_env.iter().any(|(k, _)| k == "HOME"));
        assert_eq!(cfg.user, None);
    }

    #[test]
    fn the_images_user_is_the_default_for_commands() {
        let runtime = ImageRuntime {
            user: Some("1000:1000".into()),
            ..Default::default()
        };
        assert_eq!(
            serve_config(Some(&runtime)).0.user.as_deref(),
            Some("1000:1000")
        );
        let blank = ImageRuntime {
            user: Some(" ".into()),
            ..Default::default()
        };
        assert_eq!(serve_config(Some(&blank)).0.user, None);
    }
}
