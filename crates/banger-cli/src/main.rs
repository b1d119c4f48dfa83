//! `banger`, the command-line interface. Parses commands with clap, talks to `bangerd` through
//! [`client`], draws progress with [`render`], and maps failures to the documented exit
//! statuses of [`exit`]. It never touches banger's state directly.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, CommandFactory, Parser, Subcommand};
use clap_complete::ArgValueCandidates;

mod client;
mod cmd_daemon;
mod cmd_host;
mod cmd_image;
mod cmd_run;
mod cmd_snapshot;
mod cmd_vm;
mod complete;
mod doctor;
mod exit;
mod render;
mod safe_text;
mod session;
mod spec;
mod workspace;

use exit::{CliError, Exit, EXIT_CODES_HELP};

/// One-command development sandboxes on microVMs.
#[derive(Parser)]
#[command(name = "banger", version, about, after_long_help = EXIT_CODES_HELP)]
pub struct Cli {
    /// Show the output of tools the daemon runs (debootstrap, mkfs, ...).
    #[arg(short, long, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create, run, reach and remove VMs.
    #[command(subcommand)]
    Vm(VmCmd),
    /// Manage images (root filesystems) in the store.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Manage kernels in the store.
    #[command(subcommand)]
    Kernel(KernelCmd),
    /// Manage snapshots of VMs (take one with `banger vm snapshot`).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Manage the banger daemon (started automatically by any command).
    #[command(subcommand)]
    Daemon(DaemonCmd),
    /// Check this host: KVM, VMM binaries, networking tools, disk; exits 1 if anything fails.
    Doctor(JsonFlag),
    /// Print the shell completion script for bash, zsh, fish or powershell.
    #[command(after_long_help = complete::LOADING_HELP)]
    Completion {
        #[arg(value_parser = ["bash", "zsh", "fish", "powershell"])]
        shell: String,
    },
    /// Write man pages for banger and every subcommand into DIR (used by `make install`).
    #[command(hide = true, name = "__manpages")]
    Manpages { dir: PathBuf },
    /// Print the ssh Include line for `ssh NAME.vm`, or add/remove it in ~/.ssh/config.
    SshConfig {
        /// Add a marker-fenced block with the Include line to ~/.ssh/config (idempotent).
        #[arg(long, conflicts_with = "uninstall")]
        install: bool,
        /// Remove exactly that block again.
        #[arg(long)]
        uninstall: bool,
    },
}

#[derive(Args)]
pub struct JsonFlag {
    /// Print machine-readable JSON on stdout.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum ImageCmd {
    /// List images: name, source, size, kernel, created, and where each came from (an OCI
    /// image's reference and manifest digest).
    List(JsonFlag),
    /// Build an image locally from a recipe (debian-bookworm, debian-bookworm-slim).
    Build {
        /// Recipe to build.
        recipe: String,
        /// Store the image under this name (default: the recipe's name).
        #[arg(long)]
        name: Option<String>,
    },
    /// Pull an image: a catalog name, a bundle manifest URL (http, https, file), or an OCI image
    /// from any registry (`alpine:3.20`, `ghcr.io/org/tool@sha256:...`, `docker://NAME` to skip
    /// the catalog). Registry credentials come from ~/.docker/config.json; plain HTTP only for
    /// loopback registries and `insecure_registries`.
    #[command(verbatim_doc_comment)]
    Pull {
        /// Catalog name, manifest URL, or OCI image reference.
        reference: String,
        /// Store the image under this name (OCI default: repository and tag, e.g. alpine-3-20).
        #[arg(long)]
        name: Option<String>,
        /// Print the progress events and the result as JSON lines on stdout.
        #[arg(long)]
        json: bool,
    },
    /// Export an image with its kernel as a bundle (manifest + zstd files) into a directory.
    Export {
        #[arg(add = ArgValueCandidates::new(complete::images))]
        name: String,
        /// Output directory (created; must be empty if it exists).
        #[arg(short, long)]
        output: PathBuf,
    },
    /// Register an existing root filesystem and kernel as an image.
    Register {
        name: String,
        /// ext4 root filesystem image.
        #[arg(long)]
        rootfs: PathBuf,
        /// Kernel (bzImage or vmlinux).
        #[arg(long)]
        kernel: PathBuf,
        /// Initial ramdisk for the kernel.
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    /// Delete an image and its files (and cached OCI layers no other image needs).
    Delete {
        #[arg(add = ArgValueCandidates::new(complete::images))]
        name: String,
    },
    /// Remove cached OCI layers and interrupted downloads that no image needs.
    Prune,
}

/// What a new VM is: shared by `vm create` and `vm run`.
#[derive(Args)]
pub struct NewVmArgs {
    /// VM name (a DNS label); generated when omitted.
    #[arg(long)]
    pub name: Option<String>,
    /// Image to boot (default: `default_image_name` from config, else debian-bookworm).
    #[arg(long, add = ArgValueCandidates::new(complete::images))]
    pub image: Option<String>,
    /// Number of vCPUs.
    #[arg(long)]
    pub vcpu: Option<u32>,
    /// Memory, in MiB or as a size like 2G.
    #[arg(long, value_parser = spec::parse_memory)]
    pub memory: Option<u32>,
    /// Size of the work disk mounted at /root, like 16G.
    #[arg(long, value_parser = spec::parse_disk)]
    pub disk: Option<u64>,
    /// Let the guest reach services on the host (a dev server, say). Without it, a guest
    /// reaches only the host's DNS, as with `host_access = false` in the config.
    #[arg(long)]
    pub host_access: bool,
    /// Let the guest reach NAME beyond the host (repeatable; `*.example.org` for every name
    /// under it). The guest's egress becomes an allow-list: these names, plus the config's
    /// `[network] egress` list if it has one. Other names do not resolve and other addresses
    /// are unreachable.
    #[arg(
        long = "allow-host",
        value_name = "NAME",
        conflicts_with = "no_network"
    )]
    pub allow_hosts: Vec<String>,
    /// No traffic beyond the host and none to or from other guests; names outside `.vm` do not
    /// resolve. The agent (exec, sessions, workspace copy) still works.
    #[arg(long, conflicts_with = "host_access")]
    pub no_network: bool,
    /// Boot the image even where a warm snapshot of it could be restored (and keep none). By
    /// default the first VM of an image and shape boots and leaves a warm snapshot behind,
    /// and later ones start from it in a fraction of the time.
    #[arg(long)]
    pub cold: bool,
}

impl NewVmArgs {
    pub fn flags(&self) -> spec::Flags {
        spec::Flags {
            vcpu: self.vcpu,
            memory_mib: self.memory,
            disk: self.disk,
        }
    }
}

#[derive(Args)]
pub struct CreateArgs {
    #[command(flatten)]
    vm: NewVmArgs,
    /// Create the VM without booting it.
    #[arg(long, conflicts_with = "from")]
    no_start: bool,
    /// Make the VM from a snapshot (`banger snapshot list`): running in a moment, as the
    /// snapshotted VM was, with its own address, MAC, name, keys and machine-id. Its image
    /// and shape are the snapshot's.
    #[arg(long, value_name = "SNAP", conflicts_with_all = ["image", "vcpu", "memory", "disk", "cold"])]
    from: Option<String>,
}

#[derive(Subcommand)]
pub enum VmCmd {
    /// Run a VM in one command: bare (interactive ssh), with a repo copied to /root/repo,
    /// with a command (`-- make test`; exits with its status), or ephemeral (--rm).
    #[command(after_long_help = EXIT_CODES_HELP)]
    Run(cmd_run::RunArgs),
    /// Create a VM from an image and boot it (or, with --from, from a snapshot).
    Create(CreateArgs),
    /// Boot a stopped VM.
    Start {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
    },
    /// Shut a VM down (gracefully, then forced after a timeout).
    Stop {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// Kill it at once.
        #[arg(long)]
        force: bool,
    },
    /// Stop and start a VM.
    Restart {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
    },
    /// Delete a VM and its disks.
    Delete {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// Delete it even if it is running.
        #[arg(long)]
        force: bool,
    },
    /// List VMs: name, state, IP, image, spec, age.
    List(JsonFlag),
    /// Show one VM in detail.
    Show {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        #[arg(long)]
        json: bool,
    },
    /// Open a login shell in a VM, or run a command there; exits with its status.
    ///
    /// Guests that run sshd are reached with OpenSSH; the others (images without sshd) through
    /// the guest agent, with a real terminal: window size and resizes, Ctrl-C, Ctrl-D, and your
    /// terminal restored afterwards. Through the agent, as with OpenSSH, a login shell gets a
    /// terminal when stdin is one, and a command (run by `sh -c`) gets one only with -t.
    Ssh {
        /// The VM to log into.
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// Ask for a terminal even with a command (`ssh -t`); through the agent, even when
        /// stdin is not a terminal.
        #[arg(short = 't', long)]
        tty: bool,
        /// Command to run instead of a login shell.
        #[arg(last = true)]
        command: Vec<String>,
    },
    /// Run a command in a VM through the guest agent (no sshd needed); exits with its status.
    ///
    /// Stdin is passed on when it is a pipe or a file (from a terminal the command gets an empty
    /// stdin unless -t is given). Ctrl-C sends SIGINT to the command; a second Ctrl-C stops
    /// waiting. With -t the command runs on a terminal in the guest (stdout and stderr merged,
    /// your terminal in raw mode while it runs, so Ctrl-C and Ctrl-D go to it as keys).
    Exec {
        /// The VM to run it in.
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// Give the command an empty stdin even when banger's is a pipe or a file (as in a
        /// `while read` loop over a file).
        #[arg(short = 'n', long, conflicts_with = "tty")]
        no_stdin: bool,
        /// Run the command on a terminal, for interactive programs (like `ssh -t`).
        #[arg(short = 't', long)]
        tty: bool,
        /// Run as this user instead of the image's (`name`, `uid`, `name:group`, `uid:gid`).
        #[arg(short = 'u', long)]
        user: Option<String>,
        /// The program and its arguments, after `--`.
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Snapshot a running VM: pause it, save its memory, devices and disks, and resume it
    /// (a second or two; the guest notices only the pause). Prints the snapshot's name.
    Snapshot {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// Name the snapshot (default: VM-1, VM-2, ...).
        #[arg(long = "name", id = "snapshot_name", value_name = "SNAP")]
        snapshot: Option<String>,
    },
    /// Make N new VMs from a running VM's current state (its files and processes), each with
    /// its own address, MAC, name, keys and machine-id; the VM runs on. Prints their names.
    Fork {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// How many.
        #[arg(short = 'n', long, default_value_t = 1)]
        count: u32,
    },
    /// Print a VM's serial console and boot log.
    Logs {
        #[arg(add = ArgValueCandidates::new(complete::vms))]
        name: String,
        /// Keep printing new output until the VM stops.
        #[arg(short, long)]
        follow: bool,
    },
}

#[derive(Subcommand)]
pub enum SnapshotCmd {
    /// List snapshots: name, kind (`warm` ones banger keeps to start VMs fast, or `taken` with
    /// `vm snapshot`), VM, image, VMM, shape and the space they take.
    List(JsonFlag),
    /// Delete a snapshot and its files.
    Delete { name: String },
}

#[derive(Subcommand)]
pub enum KernelCmd {
    /// List kernels.
    List(JsonFlag),
    /// Pull only the kernel (and initrd) of a bundle: a catalog name or a manifest URL; or
    /// `generic`, the kernel OCI images boot with (Debian's cloud kernel from its package on
    /// the Debian mirror), fetched again and replaced when Debian has a newer one.
    Pull {
        /// Catalog name, manifest URL (http, https, file), or `generic`.
        reference: String,
        /// Store the kernel under this name (required for URLs).
        #[arg(long)]
        name: Option<String>,
    },
    /// Register a kernel (and initrd) from files.
    Register {
        name: String,
        #[arg(long)]
        kernel: PathBuf,
        #[arg(long)]
        initrd: Option<PathBuf>,
    },
    /// Delete a kernel no image uses.
    Delete {
        #[arg(add = ArgValueCandidates::new(complete::kernels))]
        name: String,
    },
}

#[derive(Subcommand)]
pub enum DaemonCmd {
    /// Show whether bangerd runs, its pid, socket and log.
    Status(JsonFlag),
    /// Stop bangerd (running VMs keep running and are re-adopted by the next daemon).
    Stop,
    /// Stop bangerd and start it again (e.g. after upgrading banger).
    Restart,
}

/// Context every command gets.
pub struct Ctx {
    pub paths: banger_config::Paths,
    pub verbose: bool,
}

/// Makes a user-supplied path absolute without requiring it to exist.
pub fn absolute(p: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(p).map_err(|e| {
        CliError::new(
            Exit::Usage,
            format!("cannot resolve path {}: {e}", p.display()),
        )
    })
}

/// One page per command, named like git's (`banger-vm-run.1`).
fn write_manpages(dir: &Path) -> Result<ExitCode, CliError> {
    fn walk(cmd: &clap::Command, name: &str, dir: &Path) -> std::io::Result<()> {
        if cmd.is_hide_set() {
            return Ok(());
        }
        let cmd = cmd.clone().name(name.to_owned());
        let mut buf = Vec::new();
        clap_mangen::Man::new(cmd.clone()).render(&mut buf)?;
        std::fs::write(dir.join(format!("{name}.1")), buf)?;
        for sub in cmd.get_subcommands() {
            walk(sub, &format!("{name}-{}", sub.get_name()), dir)?;
        }
        Ok(())
    }
    std::fs::create_dir_all(dir)
        .and_then(|_| walk(&Cli::command(), "banger", dir))
        .map_err(|e| {
            CliError::new(
                Exit::Failure,
                format!("cannot write man pages to {}: {e}", dir.display()),
            )
        })?;
    Ok(ExitCode::SUCCESS)
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    let ctx = Ctx {
        paths: banger_config::Paths::from_env()?,
        verbose: cli.verbose,
    };
    match cli.command {
        Command::Vm(c) => cmd_vm::vm(&ctx, c).await,
        Command::Image(c) => cmd_image::image(&ctx, c).await,
        Command::Kernel(c) => cmd_image::kernel(&ctx, c).await,
        Command::Snapshot(c) => cmd_snapshot::snapshot(&ctx, c).await,
        Command::Daemon(c) => cmd_daemon::daemon(&ctx, c).await,
        Command::Doctor(f) => cmd_host::doctor(&ctx, f.json),
        Command::Completion { shell } => complete::print_script(&shell),
        Command::Manpages { dir } => write_manpages(&dir),
        Command::SshConfig { install, uninstall } => cmd_host::ssh_config(&ctx, install, uninstall),
    }
}

fn main() -> ExitCode {
    // The scripts call `banger` from PATH, so they stay valid wherever banger is installed.
    clap_complete::CompleteEnv::with_factory(Cli::command)
        .completer("banger")
        .complete();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(e.exit as u8)
        }
    }
}
