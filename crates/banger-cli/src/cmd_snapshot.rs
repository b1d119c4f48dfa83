//! `banger snapshot list|delete` and `banger vm snapshot`: snapshots of running VMs.

use std::process::ExitCode;

use banger_api::snapshot::{CreateSnapshotRequest, SnapshotInfo};
use banger_api::Deleted;
use hyper::Method;

use crate::client::Client;
use crate::exit::CliError;
use crate::render::{human_bytes, table};
use crate::{Ctx, SnapshotCmd};

/// `banger vm snapshot VM [--name SNAP]`: prints the snapshot's name.
pub async fn take(ctx: &Ctx, vm: &str, name: Option<String>) -> Result<ExitCode, CliError> {
    let client = Client::connect(&ctx.paths).await?;
    let req = CreateSnapshotRequest { name };
    let s: SnapshotInfo = client
        .call(Method::POST, &format!("/v1/vms/{vm}/snapshot"), Some(&req))
        .await?;
    eprintln!(
        "snapshot {} of VM {vm}: {} ({})",
        s.name,
        human_bytes(s.bytes),
        s.dir
    );
    println!("{}", s.name);
    Ok(ExitCode::SUCCESS)
}

pub async fn snapshot(ctx: &Ctx, cmd: SnapshotCmd) -> Result<ExitCode, CliError> {
    let client = Client::connect(&ctx.paths).await?;
    match cmd {
        SnapshotCmd::List(f) => {
            let snapshots: Vec<SnapshotInfo> = client
                .call(Method::GET, "/v1/snapshots", None::<&()>)
                .await?;
            if f.json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&snapshots).unwrap_or_default()
                );
            } else if snapshots.is_empty() {
                eprintln!("no snapshots yet; take one with `banger vm snapshot VM`");
            } else {
                let rows: Vec<Vec<String>> = snapshots
                    .iter()
                    .map(|s| {
                        vec![
                            s.name.clone(),
                            if s.warm { "warm" } else { "taken" }.to_owned(),
                            s.vm.clone(),
                            s.image.clone(),
                            s.vmm.clone(),
                            format!(
                                "{} vCPU, {} MiB, {} disk",
                                s.spec.vcpu,
                                s.spec.memory_mib,
                                human_bytes(s.spec.disk_bytes)
                            ),
                            human_bytes(s.bytes),
                            crate::cmd_image::created_short(&s.created_at),
                        ]
                    })
                    .collect();
                print!(
                    "{}",
                    table(
                        &["NAME", "KIND", "VM", "IMAGE", "VMM", "SHAPE", "SIZE", "CREATED"],
                        &rows
                    )
                );
            }
        }
        SnapshotCmd::Delete { name } => {
            let d: Deleted = client
                .call(
                    Method::DELETE,
                    &format!("/v1/snapshots/{name}"),
                    None::<&()>,
                )
                .await?;
            eprintln!("deleted snapshot {}", d.name);
        }
    }
    Ok(ExitCode::SUCCESS)
}
