//! `banger vm ...`: the VM lifecycle commands. Sessions (`vm ssh`) on guests with sshd hand the
//! terminal to OpenSSH by replacing this process, so ssh owns the TTY and its exit status is
//! ours; on guests without sshd, and for `vm exec`, they go through the guest agent
//! ([`crate::session`]) and exit with the command's status.

use std::io::{IsTerminal, Write};
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use banger_api::vm::{CreateVmRequest, SshTarget, StopVmRequest, VmInfo};
use banger_api::Deleted;
use http_body_util::BodyExt;
use hyper::Method;

use crate::client::Client;
use crate::exit::{CliError, Exit};
use crate::render::{human_duration, table, Renderer};
use crate::session::Session;
use crate::spec;
use crate::{Ctx, VmCmd};

/// How a VM just created started: `warm start from snapshot S` (banger's warm snapshots are
/// named `warm-...`, a name users cannot take), `restored from snapshot S`, or `cold boot`.
pub fn start_kind(vm: &VmInfo) -> String {
    match &vm.started_from {
        Some(s) if s.starts_with("warm-") => format!("warm start from snapshot {s}"),
        Some(s) => format!("restored from snapshot {s}"),
        None => "cold boot".to_owned(),
    }
}

pub async fn vm(ctx: &Ctx, cmd: VmCmd) -> Result<ExitCode, CliError> {
    if let VmCmd::Run(args) = cmd {
        return crate::cmd_run::run(ctx, args).await;
    }
    let client = Client::connect(&ctx.paths).await?;
    match cmd {
        VmCmd::Run(_) => return unreachable_run(),
        VmCmd::Create(args) => {
            let config = banger_config::Config::load(&ctx.paths.config_file())?;
            let home = std::env::var_os("HOME")
                .map(std::path::PathBuf::from)
                .unwrap_or_default();
            let file_sync = crate::cmd_run::resolve_file_sync(&config.file_sync, &home)?;
            let resolved =
                spec::resolve(args.vm.flags(), &config.vm_defaults, spec::Host::detect());
            let image = args
                .vm
                .image
                .unwrap_or_else(|| config.default_image().to_owned());
            match &args.from {
                None => eprintln!("spec: {}, image {image}", resolved.describe()),
                Some(snap) => eprintln!("from snapshot {snap} (its image and shape)"),
            }
            let req = CreateVmRequest {
                name: args.vm.name,
                image,
                spec: resolved.spec,
                start: !args.no_start,
                file_sync,
                host_access: args.vm.host_access,
                allow_hosts: args.vm.allow_hosts.clone(),
                no_network: args.vm.no_network,
                from: args.from,
                cold: args.vm.cold,
            };
            let vm: VmInfo = streamed(ctx, &client, "/v1/vms", &req).await?;
            println!("{}", vm.name);
            let how = match vm.state {
                banger_api::vm::VmState::Running => format!(", {}", start_kind(&vm)),
                _ => String::new(),
            };
            eprintln!(
                "VM {} is {} at {}{how} (`banger vm ssh {}` to log in)",
                vm.name, vm.state, vm.ip, vm.name
            );
        }
        VmCmd::Start { name } => {
            let vm: VmInfo = streamed(ctx, &client, &format!("/v1/vms/{name}/start"), &()).await?;
            eprintln!("VM {} is {} at {}", vm.name, vm.state, vm.ip);
        }
        VmCmd::Restart { name } => {
            let vm: VmInfo =
                streamed(ctx, &client, &format!("/v1/vms/{name}/restart"), &()).await?;
            eprintln!("VM {} is {} at {}", vm.name, vm.state, vm.ip);
        }
        VmCmd::Stop { name, force } => {
            let vm: VmInfo = client
                .call(
                    Method::POST,
                    &format!("/v1/vms/{name}/stop"),
                    Some(&StopVmRequest { force }),
                )
                .await?;
            eprintln!("VM {} is {}", vm.name, vm.state);
        }
        VmCmd::Delete { name, force } => {
            let d: Deleted = client
                .call(
                    Method::DELETE,
                    &format!("/v1/vms/{name}?force={force}"),
                    None::<&()>,
                )
                .await?;
            eprintln!("deleted VM {}", d.name);
        }
        VmCmd::List(f) => {
            let vms: Vec<VmInfo> = client.call(Method::GET, "/v1/vms", None::<&()>).await?;
            if f.json {
                println!("{}", serde_json::to_string_pretty(&vms).unwrap_or_default());
            } else if vms.is_empty() {
                eprintln!("no VMs; create one with `banger vm create` or `banger vm run`");
            } else {
                let rows: Vec<Vec<String>> = vms.iter().map(list_row).collect();
                print!(
                    "{}",
                    table(&["NAME", "STATE", "IP", "IMAGE", "SPEC", "AGE"], &rows)
                );
            }
        }
        VmCmd::Show { name, json } => {
            let vm: VmInfo = client
                .call(Method::GET, &format!("/v1/vms/{name}"), None::<&()>)
                .await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&vm).unwrap_or_default());
            } else {
                print_vm(&vm);
            }
        }
        VmCmd::Ssh { name, tty, command } => return ssh(&client, &name, tty, command).await,
        VmCmd::Exec {
            name,
            no_stdin,
            tty,
            user,
            command,
        } => {
            // A terminal session always takes what is typed; otherwise stdin is passed on when
            // it is a pipe or a file.
            let stdin = tty || (!no_stdin && !std::io::stdin().is_terminal());
            let s = Session {
                argv: command,
                stdin,
                tty,
                user,
                cwd: None,
            };
            return crate::session::run(&client, &name, s).await;
        }
        VmCmd::Fork { name, count } => {
            let req = banger_api::vm::ForkVmRequest { count };
            let vms: Vec<VmInfo> =
                streamed(ctx, &client, &format!("/v1/vms/{name}/fork"), &req).await?;
            for vm in &vms {
                println!("{}", vm.name);
                eprintln!("VM {} is {} at {}", vm.name, vm.state, vm.ip);
            }
        }
        VmCmd::Snapshot { name, snapshot } => {
            return crate::cmd_snapshot::take(ctx, &name, snapshot).await;
        }
        VmCmd::Logs { name, follow } => {
            let resp = client
                .get_stream(&format!("/v1/vms/{name}/logs?follow={follow}"))
                .await?;
            let mut body = resp;
            let mut out = std::io::stdout();
            // On a terminal the guest's escape sequences are shown, not obeyed; into a file or
            // a pipe the log goes byte for byte.
            let mut shown = out.is_terminal().then(crate::safe_text::Printable::default);
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    CliError::new(Exit::DaemonUnreachable, format!("log stream broke: {e}"))
                })?;
                if let Some(data) = frame.data_ref() {
                    let _ = match shown.as_mut() {
                        Some(p) => out.write_all(p.push(data).as_bytes()),
                        None => out.write_all(data),
                    };
                    let _ = out.flush();
                }
            }
            if let Some(p) = shown.as_mut() {
                let _ = out.write_all(p.finish().as_bytes());
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn streamed<T: serde::de::DeserializeOwned>(
    ctx: &Ctx,
    client: &Client,
    path: &str,
    body: &impl serde::Serialize,
) -> Result<T, CliError> {
    let mut renderer = Renderer::new(ctx.verbose);
    let result = client.stream(path, body, |e| renderer.event(e)).await;
    let took = renderer.finish();
    if result.is_ok() {
        eprintln!("done in {}", human_duration(took));
    }
    result
}

fn age(created: &str) -> String {
    let Ok(t) =
        time::OffsetDateTime::parse(created, &time::format_description::well_known::Rfc3339)
    else {
        return "?".into();
    };
    let secs = (time::OffsetDateTime::now_utc() - t).whole_seconds().max(0);
    match secs {
        s if s < 120 => format!("{s}s"),
        s if s < 7200 => format!("{}m", s / 60),
        s if s < 172_800 => format!("{}h", s / 3600),
        s => format!("{}d", s / 86400),
    }
}

fn list_row(v: &VmInfo) -> Vec<String> {
    vec![
        v.name.clone(),
        v.state.to_string(),
        v.ip.clone(),
        v.image.clone(),
        format!(
            "{}cpu/{}M/{}",
            v.spec.vcpu,
            v.spec.memory_mib,
            banger_config::ByteSize(v.spec.disk_bytes)
        ),
        age(&v.created_at),
    ]
}

/// A VM's egress policy in words. The names were checked by the daemon, but are printed
/// escaped like anything else that passed through it.
fn describe_egress(e: &banger_api::vm::EgressInfo) -> String {
    match e.mode.as_str() {
        "open" => "open (anywhere)".to_owned(),
        "deny" => "deny (nothing beyond the host)".to_owned(),
        "none" => "none (--no-network: nothing beyond the host, no other VM)".to_owned(),
        "allow" => format!("only {}", crate::safe_text::printable(&e.hosts.join(", "))),
        other => crate::safe_text::printable(other).into_owned(),
    }
}

fn print_vm(v: &VmInfo) {
    println!("name:        {}", v.name);
    println!("state:       {}", v.state);
    if let Some(e) = &v.last_error {
        // It may quote the guest's console.
        println!("last error:  {}", crate::safe_text::printable(e));
    }
    println!("ip:          {}", v.ip);
    println!(
        "network:     {}",
        if v.host_access {
            "reaches the host's services (host access)"
        } else {
            "reaches the host's DNS only"
        }
    );
    println!("egress:      {}", describe_egress(&v.egress));
    println!("mac:         {}", v.mac);
    println!("tap:         {}", v.tap);
    println!("image:       {}", v.image);
    println!("kernel:      {}", v.kernel);
    println!(
        "spec:        {} vCPU, {} MiB memory, {} disk",
        v.spec.vcpu,
        v.spec.memory_mib,
        banger_config::ByteSize(v.spec.disk_bytes)
    );
    if let Some(vmm) = &v.vmm {
        println!("vmm:         {vmm}");
    }
    if let Some(pid) = v.pid {
        println!("pid:         {pid}");
    }
    println!("created:     {}", v.created_at);
    println!("console log: {}", v.console_log);
}

/// `vm ssh`: OpenSSH where the guest runs sshd (replacing this process), else a session through
/// the agent with OpenSSH's rules: a login shell on a terminal when no command is given (and
/// stdin is a terminal), a command without one unless `-t` asks for it (so its output keeps
/// plain `\n` line ends when redirected).
async fn ssh(
    client: &Client,
    name: &str,
    tty: bool,
    command: Vec<String>,
) -> Result<ExitCode, CliError> {
    let vm: VmInfo = client
        .call(Method::GET, &format!("/v1/vms/{name}"), None::<&()>)
        .await?;
    if !vm.ssh {
        let tty = tty || (command.is_empty() && std::io::stdin().is_terminal());
        // As sshd does: the words are joined and the shell reads them (`vm ssh web -- 'ls | wc
        // -l'` works the same with and without sshd).
        let argv = if command.is_empty() {
            command
        } else {
            vec!["sh".into(), "-c".into(), command.join(" ")]
        };
        let s = Session {
            argv,
            stdin: true,
            tty,
            user: None,
            cwd: None,
        };
        return crate::session::run(client, name, s).await;
    }
    let target: SshTarget = client
        .call(Method::GET, &format!("/v1/vms/{name}/ssh"), None::<&()>)
        .await?;
    let err = ssh_session_command(&target, &command, tty).exec();
    Err(
        CliError::new(Exit::Failure, format!("cannot run ssh: {err}"))
            .hint("install OpenSSH's client: apt-get install openssh-client"),
    )
}

/// The OpenSSH invocation for a session: banger's key, the pinned host key, no TOFU, and none
/// of the user's own ssh config (which could redirect or weaken it).
pub fn ssh_command(t: &SshTarget, command: &[String]) -> std::process::Command {
    ssh_session_command(t, command, false)
}

/// [`ssh_command`], with `force_tty` asking for a terminal even for a command (`ssh -t`).
pub fn ssh_session_command(
    t: &SshTarget,
    command: &[String],
    force_tty: bool,
) -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.args(["-F", "none", "-i", &t.identity_file])
        .args(["-o", "IdentitiesOnly=yes"])
        .args(["-o", &format!("UserKnownHostsFile={}", t.known_hosts)])
        .args(["-o", "GlobalKnownHostsFile=none"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args(["-o", &format!("HostKeyAlias={}", t.host_key_alias)])
        .args(["-o", "LogLevel=ERROR"]);
    if force_tty {
        c.arg("-t");
    }
    c.arg(format!("{}@{}", t.user, t.ip));
    if !command.is_empty() {
        c.arg("--").args(command);
    }
    c
}

/// `vm run` is dispatched before connecting (it validates config and workspace first).
fn unreachable_run() -> Result<ExitCode, CliError> {
    Err(CliError::new(
        Exit::Failure,
        "internal error: vm run dispatched twice",
    ))
}
