//! `banger vm run`: the one command. Resolves the spec, makes sure the image exists (preparing
//! the default one, or pulling an explicit OCI reference, on first use), creates and boots a
//! VM, copies the repo in as one tar stream through the guest agent, starts the tool bootstrap,
//! then runs the command (through the agent) or an interactive session (OpenSSH where the guest
//! runs sshd, the agent's terminal elsewhere), and deletes the VM afterwards with `--rm`. Every failure before the command runs maps to one of
//! banger's own exit statuses; after that, the command's status is ours.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use banger_api::vm::{CreateVmRequest, SshTarget, SyncEntry, VmInfo};
use banger_api::{ImageInfo, PullImageRequest};
use clap::Args;
use hyper::Method;

use crate::client::Client;
use crate::cmd_vm::ssh_command;
use crate::exit::{CliError, Exit};
use crate::render::{human_duration, Renderer};
use crate::spec;
use crate::workspace;
use crate::Ctx;

#[derive(Args)]
pub struct RunArgs {
    /// A repository (or, with --no-git, any directory) to copy to /root/repo in the guest.
    path: Option<PathBuf>,
    #[command(flatten)]
    vm: crate::NewVmArgs,
    /// Delete the VM when the command or session ends.
    #[arg(long)]
    rm: bool,
    /// Check out this branch of the repo in the guest (workspace mode only).
    #[arg(long, requires = "path")]
    branch: Option<String>,
    /// Create the branch from this commit or ref (with --branch).
    #[arg(long, requires = "branch")]
    from: Option<String>,
    /// Copy the directory as it is, ignoring nothing (for directories that are not git repos).
    #[arg(long, requires = "path")]
    no_git: bool,
    /// Command to run in the guest (in /root/repo when a repo was given).
    #[arg(last = true)]
    command: Vec<String>,
}

/// Quotes one argument for the remote POSIX shell.
fn sh_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./=:@%+,".contains(&b))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

/// Expands a leading `~` to `home`.
fn expand_tilde(p: &str, home: &Path) -> PathBuf {
    match p.strip_prefix("~/") {
        Some(rest) => home.join(rest),
        None if p == "~" => home.to_owned(),
        None => PathBuf::from(p),
    }
}

/// Validates `[[file_sync]]` entries before anything is created.
pub fn resolve_file_sync(
    entries: &[banger_config::FileSync],
    home: &Path,
) -> Result<Vec<SyncEntry>, CliError> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let key = |k: &str| format!("file_sync[{i}].{k}");
        let guest = if let Some(rest) = e.guest.strip_prefix("~/") {
            format!("/root/{rest}")
        } else {
            e.guest.clone()
        };
        let escapes = Path::new(&guest).components().any(|c| {
            matches!(
                c,
                std::path::Component::ParentDir | std::path::Component::CurDir
            )
        });
        if !guest.starts_with("/root/") || guest.len() <= "/root/".len() || escapes {
            return Err(CliError::new(
                Exit::Usage,
                format!(
                    "invalid config: key `{}` = {:?}: guest paths must be under ~/ or /root/ and contain no '..'",
                    key("guest"),
                    e.guest
                ),
            )
            .hint("file_sync copies files onto the VM's work disk, which is mounted at /root"));
        }
        // The daemon has its own working directory: a relative path means the CLI's.
        let host = crate::absolute(&expand_tilde(&e.host, home))?;
        if std::fs::symlink_metadata(&host).is_err() {
            return Err(CliError::new(
                Exit::Usage,
                format!(
                    "invalid config: key `{}`: host path {} does not exist",
                    key("host"),
                    host.display()
                ),
            ));
        }
        out.push(SyncEntry {
            host: host.display().to_string(),
            guest,
            mode: e.mode,
        });
    }
    Ok(out)
}

pub async fn run(ctx: &Ctx, args: RunArgs) -> Result<ExitCode, CliError> {
    let config = banger_config::Config::load(&ctx.paths.config_file())?;
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_default();
    let file_sync = resolve_file_sync(&config.file_sync, &home)?;
    let resolved = spec::resolve(args.vm.flags(), &config.vm_defaults, spec::Host::detect());
    let (image, image_from) = match &args.vm.image {
        Some(i) => (i.clone(), "flag"),
        None if config.default_image_name.is_some() => {
            (config.default_image().to_owned(), "config")
        }
        None => (config.default_image().to_owned(), "built-in"),
    };
    eprintln!(
        "spec: {}, image {image} ({image_from})",
        resolved.describe()
    );

    // Fail on a bad workspace before anything is created.
    let snapshot = match &args.path {
        None => None,
        Some(p) => {
            let root = crate::absolute(p)?;
            Some(if args.no_git {
                workspace::plain_snapshot(&root)?
            } else {
                workspace::git_snapshot(&root)?
            })
        }
    };

    let client = Client::connect(&ctx.paths).await?;
    ensure_image(ctx, &client, &image, args.vm.image.is_none()).await?;

    let req = CreateVmRequest {
        name: args.vm.name.clone(),
        image,
        spec: resolved.spec,
        start: true,
        file_sync,
        host_access: args.vm.host_access,
        allow_hosts: args.vm.allow_hosts.clone(),
        no_network: args.vm.no_network,
        from: None,
        cold: args.vm.cold,
    };
    let mut renderer = Renderer::new(ctx.verbose);
    let created: Result<VmInfo, CliError> =
        client.stream("/v1/vms", &req, |e| renderer.event(e)).await;
    let took = renderer.finish();
    let vm = match created {
        Ok(vm) => vm,
        Err(e) => {
            if e.exit == Exit::BootTimeout && args.rm {
                eprintln!("note: --rm was given, but the VM is kept so you can see why it did not come up");
            }
            return Err(e);
        }
    };
    eprintln!(
        "VM {} is up at {} ({}, {})",
        vm.name,
        vm.ip,
        crate::cmd_vm::start_kind(&vm),
        human_duration(took)
    );
    // From here on Ctrl-C belongs to the session: ssh (in our process group) receives it and
    // ends, and banger carries on to clean up (`--rm`) instead of dying with a VM left behind.
    let _sigint = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt());
    let result = session(&client, &vm, &args, snapshot.as_ref()).await;
    if args.rm {
        let d: Result<banger_api::Deleted, _> = client
            .call(
                Method::DELETE,
                &format!("/v1/vms/{}?force=true", vm.name),
                None::<&()>,
            )
            .await;
        match d {
            Ok(_) => eprintln!("deleted VM {}", vm.name),
            Err(e) => eprintln!("warning: could not delete VM {}: {e}", vm.name),
        }
    } else if args.command.is_empty() && result.is_ok() {
        eprintln!(
            "VM {n} is still running: `banger vm ssh {n}` to get back in, `banger vm delete --force {n}` to remove it",
            n = vm.name
        );
    }
    result
}

/// Makes sure `image` exists. The default image is prepared (pulled or built) on first use; an
/// image named by an explicit OCI reference (with a registry, tag or digest: `alpine:3.20`,
/// `ghcr.io/org/tool`) is pulled on first use, as `docker run` does.
async fn ensure_image(
    ctx: &Ctx,
    client: &Client,
    image: &str,
    is_default: bool,
) -> Result<(), CliError> {
    let found: Result<ImageInfo, CliError> = client
        .call(
            Method::GET,
            &format!("/v1/images/{}", crate::client::path_segment(image)),
            None::<&()>,
        )
        .await;
    let missing = match found {
        Ok(_) => return Ok(()),
        Err(e) if e.exit == Exit::NotFound => e,
        Err(e) => return Err(e),
    };
    let explicit_reference = image.contains(['/', ':', '@']);
    if !is_default && !explicit_reference {
        return Err(missing);
    }
    if is_default {
        eprintln!("first use: preparing the default image {image} (this happens once)");
    } else {
        eprintln!("first use: pulling {image}");
    }
    let mut renderer = Renderer::new(ctx.verbose);
    let req = PullImageRequest {
        reference: image.to_owned(),
        name: None,
    };
    let r: Result<ImageInfo, CliError> = client
        .stream("/v1/images/pull", &req, |e| renderer.event(e))
        .await;
    let took = renderer.finish();
    let img = r?;
    eprintln!("image {} ready in {}", img.name, human_duration(took));
    Ok(())
}

/// After the VM is up: the workspace (copy, branch, tool bootstrap) and the command go through
/// the guest agent, which under TCG answers in a tenth of the time an ssh handshake takes
/// (bench/results/agent-vs-ssh.md); an interactive shell is OpenSSH's where the guest runs sshd
/// (so the terminal is a real ssh session), the agent's elsewhere. A workspace needs `sh` and
/// `tar` in the image.
async fn session(
    client: &Client,
    vm: &VmInfo,
    args: &RunArgs,
    snapshot: Option<&workspace::Snapshot>,
) -> Result<ExitCode, CliError> {
    use std::io::IsTerminal;
    let mut workdir = None;
    if let Some(snap) = snapshot {
        copy_workspace(client, &vm.name, snap).await?;
        workdir = Some("/root/repo".to_owned());
        if let Some(script) = checkout_script(args) {
            let status = agent_sh(client, &vm.name, &script).await?;
            if status != 0 {
                return Err(branch_err(args, &vm.name));
            }
        }
        if declares_tools(&snap.root) {
            let script = format!(
                "({}) </dev/null >/dev/null 2>&1 &",
                tool_bootstrap_script(&snap.root)
            );
            match agent_sh(client, &vm.name, &script).await {
                Ok(0) => eprintln!(
                    "tool bootstrap: mise install runs in the background (log: {})",
                    tool_log(&snap.root)
                ),
                _ => eprintln!("notice: could not start the tool bootstrap; continuing"),
            }
        }
    }
    let interactive = args.command.is_empty();
    if interactive && vm.ssh {
        let target: SshTarget = client
            .call(
                Method::GET,
                &format!("/v1/vms/{}/ssh", vm.name),
                None::<&()>,
            )
            .await?;
        let mut cmd = match &workdir {
            Some(dir) => ssh_command(
                &target,
                &[format!("cd {dir} && exec \"${{SHELL:-sh}}\" -l")],
            ),
            None => ssh_command(&target, &[]),
        };
        cmd.arg("-t");
        let status = cmd.status().map_err(ssh_err)?;
        let code = status.code().unwrap_or(255);
        return Ok(ExitCode::from(
            u8::try_from(code.clamp(0, 255)).unwrap_or(255),
        ));
    }
    let s = crate::session::Session {
        argv: args.command.clone(),
        // Like ssh: a command reads a piped stdin; a shell takes the terminal.
        stdin: interactive || !std::io::stdin().is_terminal(),
        tty: interactive && std::io::stdin().is_terminal(),
        user: None,
        cwd: workdir,
    };
    crate::session::run(client, &vm.name, s).await
}

/// Runs a short `sh -c` script through the agent, without stdin, and returns its status.
async fn agent_sh(client: &Client, vm: &str, script: &str) -> Result<u8, CliError> {
    let s = crate::session::Session {
        argv: vec!["sh".into(), "-c".into(), script.to_owned()],
        ..Default::default()
    };
    crate::session::run_with_input(client, vm, s, None).await
}

/// Streams the snapshot into `/root/repo` through the agent: one exec of `tar -x` whose stdin
/// is the tar stream, written by a thread into a pipe.
async fn copy_workspace(
    client: &Client,
    vm: &str,
    snap: &workspace::Snapshot,
) -> Result<(), CliError> {
    let started = std::time::Instant::now();
    let (read, write) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)
        .map_err(|e| CliError::new(Exit::Failure, format!("cannot make a pipe: {e}")))?;
    let snap2 = snap.clone();
    let writer = std::thread::spawn(move || {
        let w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::from(write));
        workspace::write_tar(&snap2, w).and_then(|mut w| {
            w.flush().map_err(|e| {
                CliError::new(Exit::Failure, format!("cannot send the workspace: {e}"))
            })
        })
    });
    let s = crate::session::Session {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "rm -rf /root/repo && mkdir -p /root/repo && tar -x -p -C /root/repo -f -".into(),
        ],
        ..Default::default()
    };
    let status =
        crate::session::run_with_input(client, vm, s, Some(Box::new(std::fs::File::from(read))))
            .await;
    // The writer ends once the pipe's reader is gone; joining it is blocking work.
    let packed = tokio::task::spawn_blocking(move || writer.join())
        .await
        .map_err(|_| CliError::new(Exit::Failure, "the workspace writer was lost"))?
        .unwrap_or_else(|_| {
            Err(CliError::new(
                Exit::Failure,
                "the workspace writer panicked",
            ))
        });
    let status = status?;
    if status != 0 {
        return Err(CliError::new(
            Exit::VmFailed,
            format!(
                "copying {} into VM {vm} failed (tar exited with {status})",
                snap.root.display()
            ),
        )
        .hint("the image needs `sh` and `tar` for a workspace"));
    }
    packed?;
    eprintln!(
        "copied {} to /root/repo in {}",
        snap.root.display(),
        human_duration(started.elapsed())
    );
    Ok(())
}

fn ssh_err(e: std::io::Error) -> CliError {
    CliError::new(Exit::Failure, format!("cannot run ssh: {e}"))
        .hint("install OpenSSH's client: apt-get install openssh-client")
}

/// The script that checks out `--branch` (created from `--from`), if one was asked for.
fn checkout_script(args: &RunArgs) -> Option<String> {
    let b = sh_quote(args.branch.as_ref()?);
    Some(match &args.from {
        Some(from) => format!("cd /root/repo && git checkout -q -b {b} {}", sh_quote(from)),
        None => {
            format!("cd /root/repo && (git checkout -q {b} 2>/dev/null || git checkout -q -b {b})")
        }
    })
}

fn branch_err(args: &RunArgs, vm: &str) -> CliError {
    CliError::new(
        Exit::VmFailed,
        format!(
            "could not check out branch {} in VM {vm}",
            args.branch.as_deref().unwrap_or_default()
        ),
    )
    .hint("check that --from names a commit the repo has (and that the image has git)")
}

/// Whether the repo declares tools for mise.
fn declares_tools(root: &Path) -> bool {
    [".mise.toml", "mise.toml", ".tool-versions"]
        .iter()
        .any(|f| root.join(f).is_file())
}

/// Where the tool bootstrap logs, in the guest.
fn tool_log(root: &Path) -> String {
    let repo = root
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "repo".into());
    format!("/root/.cache/banger/vm-run-tooling-{}.log", sh_quote(&repo))
}

/// The guest script that runs `mise install` in /root/repo, logging to [`tool_log`].
fn tool_bootstrap_script(root: &Path) -> String {
    let log = tool_log(root);
    format!(
        "mkdir -p /root/.cache/banger && cd /root/repo && \
         (if command -v mise >/dev/null; then nohup mise install; \
          else echo 'mise is not installed in this image; skipped tool bootstrap'; fi) > {log} 2>&1 < /dev/null"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quoting_survives_the_remote_shell() {
        assert_eq!(sh_quote("make"), "make");
        assert_eq!(sh_quote("exit 3"), "'exit 3'");
        assert_eq!(sh_quote("it's"), "'it'\\''s'");
        assert_eq!(sh_quote(""), "''");
    }

    #[test]
    fn file_sync_paths_are_checked_before_anything_is_created() {
        let home = tempfile::tempdir().unwrap();
        std::fs::write(home.path().join(".gitconfig"), "x").unwrap();
        let ok = resolve_file_sync(
            &[banger_config::FileSync {
                host: "~/.gitconfig".into(),
                guest: "~/.gitconfig".into(),
                mode: Some(0o644),
            }],
            home.path(),
        )
        .unwrap();
        assert_eq!(ok[0].guest, "/root/.gitconfig");
        assert_eq!(
            ok[0].host,
            home.path().join(".gitconfig").display().to_string()
        );
        for guest in [
            "/etc/passwd",
            "~/../etc/passwd",
            "/root/a/../../x",
            "/root/",
        ] {
            let e = resolve_file_sync(
                &[banger_config::FileSync {
                    host: "~/.gitconfig".into(),
                    guest: guest.into(),
                    mode: None,
                }],
                home.path(),
            )
            .unwrap_err();
            assert!(e.message.contains("file_sync[0].guest"), "{}", e.message);
            assert_eq!(e.exit, Exit::Usage);
        }
        let e = resolve_file_sync(
            &[banger_config::FileSync {
                host: "~/missing".into(),
                guest: "~/x".into(),
                mode: None,
            }],
            home.path(),
        )
        .unwrap_err();
        assert!(e.message.contains("file_sync[0].host"), "{}", e.message);
        // A relative host path is the CLI's, not the daemon's.
        let here = std::env::current_dir().unwrap();
        let local = tempfile::tempdir_in(&here).unwrap();
        std::fs::write(local.path().join("f"), "x").unwrap();
        let rel = local.path().strip_prefix(&here).unwrap().join("f");
        let ok = resolve_file_sync(
            &[banger_config::FileSync {
                host: rel.display().to_string(),
                guest: "~/f".into(),
                mode: None,
            }],
            home.path(),
        )
        .unwrap();
        assert_eq!(ok[0].host, here.join(&rel).display().to_string());
    }
}
