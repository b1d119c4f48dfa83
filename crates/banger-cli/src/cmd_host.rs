//! Host integration commands that need no daemon: `banger doctor` and `banger ssh-config`.

use std::process::ExitCode;

use banger_config::sshconfig;

use crate::doctor;
use crate::exit::{CliError, Exit};
use crate::spec;
use crate::Ctx;

pub fn doctor(ctx: &Ctx, json: bool) -> Result<ExitCode, CliError> {
    let config = banger_config::Config::load(&ctx.paths.config_file())?;
    let bridge_address = config.bridge().subnet.gateway();
    let probe = doctor::HostProbe::new(ctx.paths.state_dir.clone(), bridge_address);
    let checks = doctor::run_checks(&probe, &banger_vmm::VmmSettings::from_config(&config));
    let resolved = spec::resolve(
        spec::Flags::default(),
        &config.vm_defaults,
        spec::Host::detect(),
    );
    if json {
        let v = serde_json::json!({
            "checks": checks,
            "vm_defaults": {
                "vcpu": { "value": resolved.spec.vcpu, "source": resolved.vcpu_from.as_str() },
                "memory_mib": { "value": resolved.spec.memory_mib, "source": resolved.memory_from.as_str() },
                "disk_bytes": { "value": resolved.spec.disk_bytes, "source": resolved.disk_from.as_str() },
            },
        });
        println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
    } else {
        print!("{}", doctor::render_text(&checks));
        println!("vm_defaults: {}", resolved.describe());
    }
    Ok(ExitCode::from(
        u8::try_from(doctor::exit_code(&checks)).unwrap_or(1),
    ))
}

pub fn ssh_config(ctx: &Ctx, install: bool, uninstall: bool) -> Result<ExitCode, CliError> {
    let ours = ctx.paths.ssh_config();
    if !install && !uninstall {
        println!("{}", sshconfig::include_line(&ours));
        eprintln!(
            "add that line at the top of ~/.ssh/config, or run `banger ssh-config --install`"
        );
        return Ok(ExitCode::SUCCESS);
    }
    let home = std::env::var_os("HOME")
        .map(std::path::PathBuf::from)
        .ok_or_else(|| CliError::new(Exit::Failure, "HOME is not set"))?;
    let user_config = home.join(".ssh/config");
    let existing = match std::fs::read(&user_config) {
        Ok(b) => Some(b),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            return Err(CliError::new(
                Exit::Failure,
                format!("cannot read {}: {e}", user_config.display()),
            ))
        }
    };
    let new = if install {
        sshconfig::install(existing.as_deref(), &sshconfig::include_block_body(&ours))
    } else {
        match &existing {
            Some(b) => sshconfig::uninstall(b),
            None => {
                eprintln!(
                    "{} does not exist; nothing to remove",
                    user_config.display()
                );
                return Ok(ExitCode::SUCCESS);
            }
        }
    };
    if existing.as_deref() == Some(new.as_slice()) {
        eprintln!("{} is already up to date", user_config.display());
        return Ok(ExitCode::SUCCESS);
    }
    sshconfig::write_atomically(&user_config, &new, sshconfig::NEW_CONFIG_MODE).map_err(|e| {
        CliError::new(
            Exit::Failure,
            format!("cannot write {}: {e}", user_config.display()),
        )
    })?;
    if install {
        eprintln!(
            "added the banger block to {}: `ssh NAME.vm` now reaches your VMs",
            user_config.display()
        );
    } else {
        eprintln!("removed the banger block from {}", user_config.display());
    }
    Ok(ExitCode::SUCCESS)
}
