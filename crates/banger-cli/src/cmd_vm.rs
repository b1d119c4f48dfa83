//! `banger vm ...`: the VM lifecycle commands. Sessions (`vm ssh`) hand the terminal to OpenSSH
//! by replacing this process, so ssh owns the TTY and its exit status is ours; `vm exec` goes
//! through the guest agent and exits with the command's status.

use std::io::Write;
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use banger_api::vm::{
    CreateVmRequest, ExecEvent, ExecRequest, ExecSignal, SshTarget, StopVmRequest, VmInfo,
};
use banger_api::Deleted;
use http_body_util::BodyExt;
use hyper::Method;

use crate::client::Client;
use crate::exit::{CliError, Exit};
use crate::render::{human_duration, table, Renderer};
use crate::spec;
use crate::{Ctx, VmCmd};

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
            eprintln!("spec: {}, image {image}", resolved.describe());
            let req = CreateVmRequest {
                name: args.vm.name,
                image,
                spec: resolved.spec,
                start: !args.no_start,
                file_sync,
            };
            let vm: VmInfo = streamed(ctx, &client, "/v1/vms", &req).await?;
            println!("{}", vm.name);
            eprintln!(
                "VM {} is {} at {} (`banger vm ssh {}` to log in)",
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
        VmCmd::Ssh { name, command } => {
            let target: SshTarget = client
                .call(Method::GET, &format!("/v1/vms/{name}/ssh"), None::<&()>)
                .await?;
            let err = ssh_command(&target, &command).exec();
            return Err(
                CliError::new(Exit::Failure, format!("cannot run ssh: {err}"))
                    .hint("install OpenSSH's client: apt-get install openssh-client"),
            );
        }
        VmCmd::Exec {
            name,
            no_stdin,
            command,
        } => return exec(&client, &name, command, no_stdin).await,
        VmCmd::Logs { name, follow } => {
            let resp = client
                .get_stream(&format!("/v1/vms/{name}/logs?follow={follow}"))
                .await?;
            let mut body = resp;
            let mut out = std::io::stdout();
            while let Some(frame) = body.frame().await {
                let frame = frame.map_err(|e| {
                    CliError::new(Exit::DaemonUnreachable, format!("log stream broke: {e}"))
                })?;
                if let Some(data) = frame.data_ref() {
                    let _ = out.write_all(data);
                    let _ = out.flush();
                }
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

fn print_vm(v: &VmInfo) {
    println!("name:        {}", v.name);
    println!("state:       {}", v.state);
    if let Some(e) = &v.last_error {
        println!("last error:  {e}");
    }
    println!("ip:          {}", v.ip);
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

/// The OpenSSH invocation for a session: banger's key, the pinned host key, no TOFU, and none
/// of the user's own ssh config (which could redirect or weaken it).
pub fn ssh_command(t: &SshTarget, command: &[String]) -> std::process::Command {
    let mut c = std::process::Command::new("ssh");
    c.args(["-F", "none", "-i", &t.identity_file])
        .args(["-o", "IdentitiesOnly=yes"])
        .args(["-o", &format!("UserKnownHostsFile={}", t.known_hosts)])
        .args(["-o", "GlobalKnownHostsFile=none"])
        .args(["-o", "StrictHostKeyChecking=yes"])
        .args(["-o", &format!("HostKeyAlias={}", t.host_key_alias)])
        .args(["-o", "LogLevel=ERROR"])
        .arg(format!("{}@{}", t.user, t.ip));
    if !command.is_empty() {
        c.arg("--").args(command);
    }
    c
}

/// `vm exec`: streams the command's output; stdin is forwarded when it is a pipe or a file and
/// `--no-stdin` is not given (from a terminal, `vm ssh` is the interactive way); Ctrl-C is passed on to the command as SIGINT, a
/// second Ctrl-C gives up waiting.
async fn exec(
    client: &Client,
    name: &str,
    command: Vec<String>,
    no_stdin: bool,
) -> Result<ExitCode, CliError> {
    use base64::Engine;
    use std::io::IsTerminal;
    let b64 = base64::engine::general_purpose::STANDARD;
    let forward_stdin = !no_stdin && !std::io::stdin().is_terminal();
    let req = ExecRequest {
        argv: command,
        cwd: None,
        env: Vec::new(),
        stdin: forward_stdin,
    };
    let mut interrupt =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
            .map_err(|e| CliError::new(Exit::Failure, format!("cannot handle Ctrl-C: {e}")))?;
    let mut body = client
        .post_stream(&format!("/v1/vms/{name}/exec"), &req)
        .await?;
    let mut buf = Vec::new();
    let mut session: Option<String> = None;
    let mut interrupts = 0;
    let (mut stdout, mut stderr) = (std::io::stdout(), std::io::stderr());
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = interrupt.recv() => {
                interrupts += 1;
                match (&session, interrupts) {
                    (Some(id), 1) => {
                        // Off this loop, so output keeps flowing and a second Ctrl-C is seen
                        // even if the daemon is slow to answer.
                        let path = format!("/v1/vms/{name}/exec/{id}/signal");
                        let c = client.clone();
                        tokio::spawn(async move {
                            let sig = ExecSignal { signal: libc::SIGINT };
                            let _: Result<serde_json::Value, _> =
                                c.call(Method::POST, &path, Some(&sig)).await;
                        });
                    }
                    _ => return Ok(ExitCode::from(130)),
                }
                continue;
            }
        };
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| {
            CliError::new(Exit::DaemonUnreachable, format!("exec stream broke: {e}"))
        })?;
        let Some(data) = frame.data_ref() else {
            continue;
        };
        buf.extend_from_slice(data);
        while let Some(pos) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=pos).collect();
            let ev: ExecEvent = serde_json::from_slice(&line)
                .map_err(|e| CliError::new(Exit::Failure, format!("bad exec event: {e}")))?;
            match ev {
                ExecEvent::Started { session: id } => {
                    if forward_stdin {
                        upload_stdin(client.clone(), format!("/v1/vms/{name}/exec/{id}/stdin"));
                    }
                    session = Some(id);
                }
                ExecEvent::Stdout { data } => {
                    let _ = stdout.write_all(&b64.decode(data).unwrap_or_default());
                    let _ = stdout.flush();
                }
                ExecEvent::Stderr { data } => {
                    let _ = stderr.write_all(&b64.decode(data).unwrap_or_default());
                }
                ExecEvent::Exit { code } => {
                    return Ok(ExitCode::from(
                        u8::try_from(code.clamp(0, 255)).unwrap_or(255),
                    ))
                }
                ExecEvent::Failed { error } => return Err(CliError::from_api(error)),
            }
        }
    }
    Err(CliError::new(
        Exit::DaemonUnreachable,
        "bangerd closed the exec stream before the command ended",
    ))
}

/// Copies this process's stdin to the command, in the background, until EOF. A blocking thread
/// reads (stdin may be a file, a pipe or a socket); the upload streams what it reads as it comes.
/// Failures are left to the exec stream to report: if the command ended, stdin no longer matters.
fn upload_stdin(client: Client, path: String) {
    use std::io::Read;
    let (tx, rx) = tokio::sync::mpsc::channel::<bytes::Bytes>(4);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx
                        .blocking_send(bytes::Bytes::copy_from_slice(&buf[..n]))
                        .is_err()
                    {
                        return;
                    }
                }
            }
        }
    });
    tokio::spawn(async move {
        let _: Result<serde_json::Value, _> = client.post_chunks(&path, rx).await;
    });
}

/// `vm run` is dispatched before connecting (it validates config and workspace first).
fn unreachable_run() -> Result<ExitCode, CliError> {
    Err(CliError::new(
        Exit::Failure,
        "internal error: vm run dispatched twice",
    ))
}
