//! `banger daemon status|stop|restart`: inspecting and cycling bangerd without auto-starting
//! it by accident (status and stop never start a daemon).

use std::process::ExitCode;
use std::time::{Duration, Instant};

use hyper::Method;

use crate::client::{Client, Probe};
use crate::exit::{CliError, Exit};
use crate::{Ctx, DaemonCmd};

pub async fn daemon(ctx: &Ctx, cmd: DaemonCmd) -> Result<ExitCode, CliError> {
    match cmd {
        DaemonCmd::Status(f) => status(ctx, f.json).await,
        DaemonCmd::Stop => {
            stop(ctx).await?;
            Ok(ExitCode::SUCCESS)
        }
        DaemonCmd::Restart => {
            stop(ctx).await?;
            let client = Client::connect(&ctx.paths).await?;
            let info = client.version().await.map_err(probe_error)?;
            eprintln!("bangerd started (pid {})", info.pid);
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn probe_error(p: Probe) -> CliError {
    match p {
        Probe::NotRunning => CliError::new(Exit::DaemonUnreachable, "bangerd is not running"),
        Probe::Failed(e) => e,
    }
}

async fn status(ctx: &Ctx, json: bool) -> Result<ExitCode, CliError> {
    let client = Client::existing(&ctx.paths);
    match client.version().await {
        Ok(info) => {
            if json {
                let v = serde_json::json!({ "running": true, "daemon": info });
                println!("{v}");
            } else {
                println!("bangerd {} is running", info.daemon_version);
                println!("  pid:         {}", info.pid);
                println!("  api version: {}", info.api_version);
                println!("  socket:      {}", info.socket);
                println!("  state:       {}", info.state_dir);
                println!("  log:         {}", info.log_file);
                if let Some(dns) = &info.dns {
                    let state = if dns.serving {
                        let routed = if dns.routed_by_resolved {
                            "; routed by systemd-resolved"
                        } else {
                            ""
                        };
                        format!("serving {} .vm names on {}{routed}", dns.names, dns.address)
                    } else {
                        format!("not serving (no VM runs); {} .vm names known", dns.names)
                    };
                    println!("  dns:         {state}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(Probe::NotRunning) => {
            if json {
                println!("{}", serde_json::json!({ "running": false }));
            } else {
                println!("bangerd is not running (any banger command starts it)");
            }
            Ok(ExitCode::from(3))
        }
        Err(Probe::Failed(e)) => Err(e),
    }
}

async fn stop(ctx: &Ctx) -> Result<(), CliError> {
    let client = Client::existing(&ctx.paths);
    let info = match client.version().await {
        Ok(info) => info,
        Err(Probe::NotRunning) => {
            eprintln!("bangerd is not running");
            return Ok(());
        }
        Err(Probe::Failed(e)) => return Err(e),
    };
    // The stop call is exempt from the version check, so it works on a mismatched daemon too.
    let _: serde_json::Value = client
        .call(Method::POST, "/v1/daemon/stop", None::<&()>)
        .await?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(info.pid).unwrap_or(i32::MAX));
    let deadline = Instant::now() + Duration::from_secs(10);
    while nix::sys::signal::kill(pid, None).is_ok() {
        if Instant::now() > deadline {
            return Err(CliError::new(
                Exit::DaemonUnreachable,
                format!("bangerd (pid {}) did not stop within 10s", info.pid),
            )
            .hint(format!("kill it with `kill {}`", info.pid)));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("bangerd (pid {}) stopped", info.pid);
    Ok(())
}
