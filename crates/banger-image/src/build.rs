//! Building an image locally from Debian packages, following a [`Recipe`].
//!
//! Phases, each reported through [`Progress::phase`]: check tools, debootstrap (its output streamed
//! as log lines), configure (files, units, chroot steps, optional steps that only warn), extract
//! the kernel and initrd, make the ext4 root filesystem, clean up the root-owned tree. Everything
//! that needs root goes through [`Privileged`], so the daemon may run as root or as a user with
//! `sudo -n`; the files handed back always belong to [`Privileged::file_owner`]. Blocking work runs
//! in child processes or on the blocking pool, never on the async runtime. This module produces
//! files in a scratch directory; storing and registering them is the daemon's job.
//!
//! Inside `work_dir`: `tree/` is the debootstrapped root (removed at the end, also on failure) and
//! `out/` receives `rootfs.ext4`, `vmlinuz-VERSION` and `initrd.img-VERSION`.
//!
//! Cancelling [`BuildRequest::cancel`] stops a build between or during its steps: the running
//! command is killed with every process it started and waited for (see [`crate::privileged`]),
//! no further step starts, the tree is removed (whatever a killed debootstrap left mounted in
//! it first, see [`crate::workdir`]) and the build ends with [`BuildError::Cancelled`].

use crate::ext4::{make_ext4, size_for_tree, Ext4Error, PrivilegedMkfs};
use crate::hosttools::{require_tool, MissingTool};
use crate::privileged::{mentions_enospc, Cancellable, PrivCommand, PrivError, Privileged};
use crate::progress::Progress;
use crate::recipe::Recipe;
use crate::workdir::{remove_as_root, ProcMounts, WorkDirError};
use banger_hint::{Hint, Report};
use std::borrow::Cow;
use std::path::{Path, PathBuf};
use tokio_util::sync::CancellationToken;

/// The filesystem label of every built root filesystem.
pub const ROOT_LABEL: &str = "banger-root";
const CHROOT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// Writes stdin to "$1" with mode "$2", replacing (not following) whatever is there. Runs inside
/// the chroot, so even an absolute symlink in the image cannot redirect it onto the host.
const WRITE_FILE: &str =
    r#"rm -f -- "$1"; mkdir -p -- "$(dirname -- "$1")"; cat > "$1"; chmod "$2" -- "$1""#;

#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub recipe: Recipe,
    /// Debian mirror URL for debootstrap (see `mirror::host_debian_mirror`).
    pub mirror: String,
    /// Scratch directory; the caller deletes it after taking the outputs.
    pub work_dir: PathBuf,
    /// Cancels the build (see the module documentation); `CancellationToken::new()` for a build
    /// that runs to its end.
    pub cancel: CancellationToken,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildOutput {
    /// Sparse ext4 file inside `work_dir`.
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    /// e.g. "6.1.0-37-cloud-amd64".
    pub kernel_version: String,
    /// Size of the root filesystem in bytes (apparent size of `rootfs`).
    pub rootfs_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    MissingTool(#[from] MissingTool),
    #[error("mirror `{0}` is not an http://, https:// or file:/ URL")]
    BadMirror(String),
    #[error(
        "debootstrap of {suite} from {mirror} failed: {status}{}",
        render_lines("last lines of the debootstrap log", log_tail)
    )]
    Debootstrap {
        suite: String,
        mirror: String,
        status: String,
        log_tail: Vec<String>,
    },
    #[error("no space left on the disk holding {}", path.display())]
    DiskFull { path: PathBuf },
    #[error("build step `{step}` failed")]
    Step {
        step: String,
        #[source]
        source: PrivError,
    },
    #[error("the image has no kernel: {} holds no vmlinuz-* file", boot.display())]
    NoKernel { boot: PathBuf },
    #[error("could not make the root filesystem")]
    Ext4(#[source] Ext4Error),
    #[error("`du` printed `{0}`, which is not a size")]
    BadDu(String),
    #[error(transparent)]
    Io(std::io::Error),
    #[error(transparent)]
    WorkDir(#[from] WorkDirError),
    #[error("the build was cancelled")]
    Cancelled,
}

impl Hint for BuildError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            // Transparent: the missing tool is not in the chain, so its hint is asked here.
            BuildError::MissingTool(e) => e.hint(),
            BuildError::BadMirror(_) => Some("set a Debian mirror URL in config".into()),
            BuildError::Debootstrap { suite, .. } => Some(
                format!(
                    "check that the mirror is reachable and serves {suite}, and that every \
                     package in the recipe exists there"
                )
                .into(),
            ),
            BuildError::DiskFull { .. } => {
                Some("free some space there (a build needs a few GiB) and build again".into())
            }
            BuildError::NoKernel { .. } => {
                Some("the recipe must install a linux-image package".into())
            }
            // Transparent too.
            BuildError::WorkDir(e) => e.hint(),
            BuildError::Step { .. }
            | BuildError::Ext4(_)
            | BuildError::BadDu(_)
            | BuildError::Io(_)
            | BuildError::Cancelled => None,
        }
    }
}

fn render_lines(title: &str, lines: &[String]) -> String {
    if lines.is_empty() {
        return String::new();
    }
    let mut s = format!("\n{title}:");
    for l in lines {
        s.push_str("\n  ");
        s.push_str(l);
    }
    s
}

impl BuildError {
    fn is_enospc(&self) -> bool {
        match self {
            BuildError::Debootstrap { log_tail, .. } => log_tail.iter().any(|l| mentions_enospc(l)),
            BuildError::Step { source, .. } => source.is_disk_full(),
            BuildError::Ext4(e) => e.is_disk_full(),
            BuildError::Io(e) => e.raw_os_error() == Some(libc::ENOSPC),
            _ => false,
        }
    }
}

/// Absolute paths of the host programs a build runs.
struct Tools {
    debootstrap: PathBuf,
    chroot: PathBuf,
    du: PathBuf,
    install: PathBuf,
}

impl Tools {
    fn find() -> Result<Tools, MissingTool> {
        // Removing the tree (crate::workdir) finds these itself; checked here, before a
        // minute of debootstrap.
        require_tool("rm", "coreutils")?;
        require_tool("umount", "mount")?;
        Ok(Tools {
            debootstrap: require_tool("debootstrap", "debootstrap")?,
            chroot: require_tool("chroot", "coreutils")?,
            du: require_tool("du", "coreutils")?,
            install: require_tool("install", "coreutils")?,
        })
    }
}

struct Ctx<'a> {
    req: &'a BuildRequest,
    tools: Tools,
    tree: PathBuf,
    out: PathBuf,
    /// Runs the build's steps; stops when the build is cancelled.
    privileged: &'a dyn Privileged,
    /// Runs the clean-up, which must work after a cancellation too.
    root: &'a dyn Privileged,
    progress: &'a dyn Progress,
}

/// Builds the image described by `req.recipe`. See the module documentation for the phases.
pub async fn build(
    req: &BuildRequest,
    privileged: &dyn Privileged,
    progress: &dyn Progress,
) -> Result<BuildOutput, BuildError> {
    let mirror = req.mirror.trim();
    if !["http://", "https://", "file:/"]
        .iter()
        .any(|p| mirror.starts_with(p))
        || mirror.contains(char::is_whitespace)
    {
        return Err(BuildError::BadMirror(req.mirror.clone()));
    }
    progress.phase("check tools");
    let tools = Tools::find()?;
    // Checked now rather than after a minute of debootstrap.
    PrivilegedMkfs::new(privileged)?;
    if privileged.file_owner().0 != 0 {
        require_tool("sudo", "sudo")?;
    }
    let steps = Cancellable::new(privileged, req.cancel.clone());
    let ctx = Ctx {
        req,
        tools,
        tree: req.work_dir.join("tree"),
        out: req.work_dir.join("out"),
        privileged: &steps,
        root: privileged,
        progress,
    };
    let io = |e| classify(BuildError::Io(e), &req.work_dir);
    fs_err::tokio::create_dir_all(&ctx.out).await.map_err(io)?;
    // A tree left by a crashed build would make debootstrap resume into a mess.
    ctx.remove_tree()
        .await
        .map_err(|e| classify(e, &req.work_dir))?;

    let result = match ctx.run().await {
        // Whichever step noticed it (a killed command, one refused to start), say why.
        Err(_) if req.cancel.is_cancelled() => Err(BuildError::Cancelled),
        other => other,
    };
    progress.phase("clean up");
    let cleanup = ctx.remove_tree().await;
    match (result, cleanup) {
        (Ok(out), Ok(())) => Ok(out),
        (Ok(out), Err(e)) => {
            // The outputs are complete and verified; a leftover tree is the caller's to delete.
            progress.notice(&leftover_tree(&ctx.tree, &e));
            Ok(out)
        }
        (Err(e), cleanup) => {
            if let Err(c) = cleanup {
                progress.notice(&leftover_tree(&ctx.tree, &c));
            }
            Err(classify(e, &req.work_dir))
        }
    }
}

/// The notice for a build tree that could not be removed: the causes, their hints, and ours.
fn leftover_tree(tree: &Path, e: &BuildError) -> String {
    Report::new(e, &[crate::HINTS])
        .context(format!(
            "could not remove the build tree {}",
            tree.display()
        ))
        .with_hint("delete it as root")
        .to_string()
}

/// Removes a build's scratch directory, including a root-owned tree a crashed or cancelled
/// build left behind and whatever is still mounted inside it.
pub async fn cleanup_work_dir(
    work_dir: &Path,
    privileged: &dyn Privileged,
    progress: &dyn Progress,
) -> Result<(), WorkDirError> {
    remove_as_root(
        work_dir,
        "build directory",
        privileged,
        &ProcMounts,
        progress,
    )
    .await
    .map(drop)
}

fn classify(e: BuildError, work_dir: &Path) -> BuildError {
    if e.is_enospc() {
        BuildError::DiskFull {
            path: work_dir.to_owned(),
        }
    } else {
        e
    }
}

impl Ctx<'_> {
    async fn run(&self) -> Result<BuildOutput, BuildError> {
        self.debootstrap().await?;
        self.configure().await?;
        let (kernel_version, kernel, initrd) = self.extract_kernel().await?;
        let (rootfs, rootfs_size) = self.make_rootfs().await?;
        Ok(BuildOutput {
            rootfs,
            kernel,
            initrd,
            kernel_version,
            rootfs_size,
        })
    }

    async fn priv_run(&self, cmd: PrivCommand) -> Result<String, BuildError> {
        match self.privileged.run(&cmd, self.progress).await {
            Ok(out) => Ok(out.stdout),
            Err(source) => Err(BuildError::Step {
                step: cmd.op,
                source,
            }),
        }
    }

    fn chroot(&self, op: String) -> PrivCommand {
        PrivCommand::new(op, &self.tools.chroot)
            .arg(&self.tree)
            .env("PATH", CHROOT_PATH)
            .env("LC_ALL", "C")
            .env("HOME", "/root")
            .env("DEBIAN_FRONTEND", "noninteractive")
            // systemctl inside a chroot without /proc must edit unit files, not call systemd.
            .env("SYSTEMD_OFFLINE", "1")
    }

    async fn debootstrap(&self) -> Result<(), BuildError> {
        let r = &self.req.recipe;
        self.progress.phase("debootstrap");
        let cmd = PrivCommand::new("debootstrap", &self.tools.debootstrap)
            .arg(format!("--variant={}", r.variant))
            .arg(format!("--arch={}", r.arch))
            .arg(format!("--components={}", r.components.join(",")))
            .arg(format!("--include={}", r.packages.join(",")))
            .arg(&r.suite)
            .arg(&self.tree)
            .arg(self.req.mirror.trim())
            .env("LC_ALL", "C")
            .env("DEBIAN_FRONTEND", "noninteractive");
        match self.privileged.run(&cmd, self.progress).await {
            Ok(_) => Ok(()),
            Err(PrivError::Failed { status, tail, .. }) => {
                let log = self.tree.join("debootstrap/debootstrap.log");
                // Only the log's end is read: debootstrap's log of a whole system is large.
                let mut log_tail = tokio::task::spawn_blocking(move || {
                    banger_config::logtail::last_lines(&log, crate::privileged::TAIL_LINES, |l| {
                        !l.trim().is_empty()
                    })
                })
                .await
                .unwrap_or_default();
                if log_tail.is_empty() {
                    log_tail = tail;
                } else if tail.iter().any(|l| mentions_enospc(l)) {
                    log_tail.extend(tail.into_iter().filter(|l| mentions_enospc(l)));
                }
                Err(BuildError::Debootstrap {
                    suite: r.suite.clone(),
                    mirror: self.req.mirror.clone(),
                    status,
                    log_tail,
                })
            }
            Err(source) => Err(BuildError::Step {
                step: "debootstrap".into(),
                source,
            }),
        }
    }

    async fn configure(&self) -> Result<(), BuildError> {
        let r = &self.req.recipe;
        self.progress.phase("configure");
        for f in &r.files {
            let cmd = self
                .chroot(format!("write {}", f.path))
                .args(["/bin/sh", "-c", WRITE_FILE, "sh"])
                .arg(&f.path)
                .arg(format!("{:04o}", f.mode))
                .stdin(f.content.as_bytes().to_vec());
            self.priv_run(cmd).await?;
        }
        for (verb, units) in [("mask", &r.mask_units), ("enable", &r.enable_units)] {
            if !units.is_empty() {
                let cmd = self
                    .chroot(format!("{verb} units"))
                    .args(["systemctl", verb])
                    .args(units);
                self.priv_run(cmd).await?;
            }
        }
        for step in &r.steps {
            let cmd = self
                .chroot(format!("step: {}", step.name))
                .args(["/bin/sh", "-eu", "-c", &step.run]);
            match self.priv_run(cmd).await {
                Ok(_) => {}
                Err(BuildError::Step { source, .. }) if step.optional => {
                    let what = step.on_failure.clone().unwrap_or_else(|| {
                        format!(
                            "optional step `{}` failed; the image is built without it",
                            step.name
                        )
                    });
                    let status = match &source {
                        PrivError::Failed { status, .. } => status.clone(),
                        other => other.to_string(),
                    };
                    self.progress
                        .notice(&format!("{what} (step `{}`: {status})", step.name));
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn extract_kernel(&self) -> Result<(String, PathBuf, Option<PathBuf>), BuildError> {
        self.progress.phase("extract kernel");
        let boot = self.tree.join("boot");
        let mut versions = Vec::new();
        let mut dir = fs_err::tokio::read_dir(&boot).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                BuildError::NoKernel { boot: boot.clone() }
            } else {
                BuildError::Io(e)
            }
        })?;
        while let Some(entry) = dir.next_entry().await.map_err(BuildError::Io)? {
            let name = entry.file_name().to_string_lossy().into_owned();
            let is_file = entry
                .file_type()
                .await
                .map(|t| t.is_file())
                .unwrap_or(false);
            if let (Some(v), true) = (name.strip_prefix("vmlinuz-"), is_file) {
                versions.push(v.to_owned());
            }
        }
        versions.sort_by_key(|v| version_key(v));
        let version = versions
            .pop()
            .ok_or(BuildError::NoKernel { boot: boot.clone() })?;
        let kernel = self.out.join(format!("vmlinuz-{version}"));
        self.copy_out(
            "copy kernel",
            &boot.join(format!("vmlinuz-{version}")),
            &kernel,
        )
        .await?;
        let initrd_src = boot.join(format!("initrd.img-{version}"));
        let initrd = if fs_err::tokio::metadata(&initrd_src)
            .await
            .is_ok_and(|m| m.is_file())
        {
            let dst = self.out.join(format!("initrd.img-{version}"));
            self.copy_out("copy initrd", &initrd_src, &dst).await?;
            Some(dst)
        } else {
            None
        };
        Ok((version, kernel, initrd))
    }

    /// Copies a root-only file out of the tree, readable and owned by the caller's user.
    async fn copy_out(&self, op: &str, src: &Path, dst: &Path) -> Result<(), BuildError> {
        let (uid, gid) = self.privileged.file_owner();
        let cmd = PrivCommand::new(op, &self.tools.install)
            .args([
                "-m",
                "0644",
                "-o",
                &uid.to_string(),
                "-g",
                &gid.to_string(),
                "-T",
                "--",
            ])
            .arg(src)
            .arg(dst);
        self.priv_run(cmd).await.map(drop)
    }

    async fn make_rootfs(&self) -> Result<(PathBuf, u64), BuildError> {
        self.progress.phase("make ext4");
        let cmd = PrivCommand::new("measure tree", &self.tools.du)
            .args(["-s", "-x", "--block-size=1", "--"])
            .arg(&self.tree);
        let du = self.priv_run(cmd).await?;
        let content: u64 = du
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| BuildError::BadDu(du.trim().to_owned()))?;
        let mut size = size_for_tree(content, self.req.recipe.headroom);
        let out = self.out.join("rootfs.ext4");
        let mkfs = PrivilegedMkfs::new(self.privileged)?;
        self.progress.log(&format!(
            "tree uses {content} bytes; making a {size}-byte filesystem"
        ));
        match make_ext4(&mkfs, &self.tree, &out, size, ROOT_LABEL, self.progress).await {
            Err(e) if e.is_too_small() => {
                // du and ext4 count metadata differently; one generous retry covers the gap.
                size = size_for_tree(size.saturating_add(size / 2), crate::ext4::MiB(0));
                self.progress
                    .log(&format!("filesystem too small, retrying with {size} bytes"));
                make_ext4(&mkfs, &self.tree, &out, size, ROOT_LABEL, self.progress)
                    .await
                    .map_err(BuildError::Ext4)?;
            }
            other => other.map_err(BuildError::Ext4)?,
        }
        Ok((out, size))
    }

    /// Removes the tree through the clean-up runner, after unmounting what a killed debootstrap
    /// left mounted in it (its /proc and /sys).
    async fn remove_tree(&self) -> Result<(), BuildError> {
        remove_as_root(
            &self.tree,
            "build tree",
            self.root,
            &ProcMounts,
            self.progress,
        )
        .await?;
        Ok(())
    }
}

/// Orders kernel versions numerically where they are numeric ("6.1.0-10" after "6.1.0-9").
fn version_key(v: &str) -> Vec<(u64, String)> {
    let mut key = Vec::new();
    let mut rest = v;
    while !rest.is_empty() {
        let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
        if digits > 0 {
            key.push((rest[..digits].parse().unwrap_or(u64::MAX), String::new()));
            rest = &rest[digits..];
        } else {
            let other = rest.len() - rest.trim_start_matches(|c: char| !c.is_ascii_digit()).len();
            key.push((0, rest[..other].to_owned()));
            rest = &rest[other..];
        }
    }
    key
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ext4::MiB;
    use crate::privileged::{PrivOutput, RecordingPrivileged};
    use crate::progress::RecordingProgress;
    use crate::recipe::builtin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    const DU_BYTES: u64 = 300 << 20;

    /// A fake host: debootstrap creates a /boot with a kernel and initrd, du reports DU_BYTES.
    fn fake_host(
        extra: impl Fn(&PrivCommand) -> Option<Result<PrivOutput, PrivError>> + Send + Sync + 'static,
    ) -> RecordingPrivileged {
        RecordingPrivileged::new(move |c| {
            if let Some(r) = extra(c) {
                return r;
            }
            match c.op.as_str() {
                "debootstrap" => {
                    let tree = PathBuf::from(&c.args[c.args.len() - 2]);
                    let boot = tree.join("boot");
                    std::fs::create_dir_all(&boot).unwrap();
                    for f in [
                        "vmlinuz-6.1.0-9-cloud-amd64",
                        "vmlinuz-6.1.0-10-cloud-amd64",
                        "initrd.img-6.1.0-10-cloud-amd64",
                    ] {
                        std::fs::write(boot.join(f), f).unwrap();
                    }
                    std::os::unix::fs::symlink(
                        "vmlinuz-6.1.0-9-cloud-amd64",
                        boot.join("vmlinuz-99-link"),
                    )
                    .unwrap();
                    Ok(PrivOutput::default())
                }
                "measure tree" => Ok(PrivOutput {
                    stdout: format!("{DU_BYTES}\t/tree\n"),
                }),
                _ => Ok(PrivOutput::default()),
            }
        })
    }

    fn request(dir: &Path, recipe: &str) -> BuildRequest {
        BuildRequest {
            recipe: builtin(recipe).unwrap(),
            mirror: "http://mirror.example/debian".into(),
            work_dir: dir.join("work"),
            cancel: CancellationToken::new(),
        }
    }

    #[tokio::test]
    async fn slim_build_runs_phases_and_commands_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let fake = fake_host(|_| None);
        let rec = RecordingProgress::new();
        let out = build(&req, &fake, &rec).await.unwrap();

        assert_eq!(
            rec.phases(),
            [
                "check tools",
                "debootstrap",
                "configure",
                "extract kernel",
                "make ext4",
                "clean up"
            ]
        );
        let ops = fake.ops();
        let mut want = vec!["debootstrap".to_string()];
        want.extend(req.recipe.files.iter().map(|f| format!("write {}", f.path)));
        want.push("mask units".into());
        want.extend(req.recipe.steps.iter().map(|s| format!("step: {}", s.name)));
        want.extend(
            [
                "copy kernel",
                "copy initrd",
                "measure tree",
                "mkfs.ext4",
                "remove build tree",
            ]
            .map(String::from),
        );
        assert_eq!(ops, want);

        let calls = fake.calls();
        let tree = req.work_dir.join("tree");
        let deb = calls[0].arg_strings();
        assert_eq!(
            &deb[..3],
            ["--variant=minbase", "--arch=amd64", "--components=main"]
        );
        assert!(
            deb[3].starts_with("--include=systemd,systemd-sysv,"),
            "{deb:?}"
        );
        assert_eq!(
            &deb[4..],
            [
                "bookworm",
                &tree.display().to_string(),
                "http://mirror.example/debian"
            ]
        );

        let sshd = calls
            .iter()
            .find(|c| c.op == "write /etc/ssh/sshd_config.d/10-banger.conf")
            .unwrap();
        let args = sshd.arg_strings();
        assert_eq!(
            args[0],
            tree.display().to_string(),
            "writes happen inside the chroot"
        );
        assert_eq!(
            &args[args.len() - 2..],
            ["/etc/ssh/sshd_config.d/10-banger.conf", "0644"]
        );
        assert!(String::from_utf8(sshd.stdin.clone().unwrap())
            .unwrap()
            .contains("PasswordAuthentication no"));
        assert!(sshd.env.contains(&("SYSTEMD_OFFLINE".into(), "1".into())));
        let mask = calls
            .iter()
            .find(|c| c.op == "mask units")
            .unwrap()
            .arg_strings();
        assert_eq!(&mask[1..3], ["systemctl", "mask"]);
        assert!(mask.contains(&"getty@tty1.service".to_string()));

        assert_eq!(
            out.kernel_version, "6.1.0-10-cloud-amd64",
            "newest regular kernel wins"
        );
        assert_eq!(
            out.kernel,
            req.work_dir.join("out/vmlinuz-6.1.0-10-cloud-amd64")
        );
        assert_eq!(
            out.initrd,
            Some(req.work_dir.join("out/initrd.img-6.1.0-10-cloud-amd64"))
        );
        assert_eq!(out.rootfs, req.work_dir.join("out/rootfs.ext4"));
        assert_eq!(out.rootfs_size, size_for_tree(DU_BYTES, MiB(512)));
        assert_eq!(
            std::fs::metadata(&out.rootfs).unwrap().len(),
            out.rootfs_size
        );
        let copy = calls
            .iter()
            .find(|c| c.op == "copy kernel")
            .unwrap()
            .arg_strings();
        assert_eq!(&copy[..6], ["-m", "0644", "-o", "0", "-g", "0"]);
    }

    #[tokio::test]
    async fn as_a_user_outputs_are_handed_to_that_user() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let fake = fake_host(|_| None).with_owner(1000, 1001);
        build(&req, &fake, &RecordingProgress::new()).await.unwrap();
        for op in ["copy kernel", "copy initrd"] {
            let c = fake
                .calls()
                .into_iter()
                .find(|c| c.op == op)
                .unwrap()
                .arg_strings();
            assert_eq!(&c[2..6], ["-o", "1000", "-g", "1001"], "{op}");
        }
    }

    #[tokio::test]
    async fn failed_optional_step_is_a_notice_and_the_build_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm");
        let fake = fake_host(|c| {
            (c.op == "step: install mise").then(|| {
                Err(PrivError::failed(
                    &c.op,
                    6,
                    &["curl: (6) Could not resolve host"],
                ))
            })
        });
        let rec = RecordingProgress::new();
        build(&req, &fake, &rec).await.unwrap();
        let notices = rec.notices();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert!(
            notices[0].starts_with("mise could not be installed"),
            "{}",
            notices[0]
        );
        assert!(notices[0].contains("exit status: 6"), "{}", notices[0]);
        assert!(fake.ops().contains(&"step: reset resolv.conf".to_string()));
    }

    #[tokio::test]
    async fn failed_required_step_fails_the_build_and_still_removes_the_tree() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let fake = fake_host(|c| {
            (c.op == "step: lock root password")
                .then(|| Err(PrivError::failed(&c.op, 1, &["usermod: oops"])))
        });
        let err = build(&req, &fake, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(
            matches!(&err, BuildError::Step { step, .. } if step == "step: lock root password"),
            "{err}"
        );
        assert_eq!(
            fake.ops().last().map(String::as_str),
            Some("remove build tree")
        );
        assert!(!fake.ops().contains(&"mkfs.ext4".to_string()));
    }

    #[tokio::test]
    async fn debootstrap_failure_shows_status_and_the_end_of_its_log() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let fake = fake_host(|c| {
            (c.op == "debootstrap").then(|| {
                let tree = PathBuf::from(&c.args[c.args.len() - 2]);
                std::fs::create_dir_all(tree.join("debootstrap")).unwrap();
                let log: String = (1..=30)
                    .map(|i| format!("log line {i}\n"))
                    .collect::<String>()
                    + "E: Couldn't find these debs: nosuchpkg\n";
                std::fs::write(tree.join("debootstrap/debootstrap.log"), log).unwrap();
                Err(PrivError::failed("debootstrap", 1, &["E: see log"]))
            })
        });
        let err = build(&req, &fake, &RecordingProgress::new())
            .await
            .unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.starts_with(
                "debootstrap of bookworm from http://mirror.example/debian failed: exit status: 1"
            ),
            "{msg}"
        );
        assert!(
            msg.contains("E: Couldn't find these debs: nosuchpkg"),
            "{msg}"
        );
        assert!(
            msg.contains("log line 30") && !msg.contains("log line 11\n"),
            "{msg}"
        );
        assert!(
            err.hint().unwrap().contains("every package in the recipe"),
            "{msg}"
        );
        assert_eq!(fake.ops(), ["debootstrap", "remove build tree"]);
    }

    #[tokio::test]
    async fn enospc_anywhere_becomes_disk_full_for_the_work_dir() {
        for failing in [
            "debootstrap",
            "step: clean apt caches",
            "mkfs.ext4",
            "copy kernel",
        ] {
            let dir = tempfile::tempdir().unwrap();
            let req = request(dir.path(), "debian-bookworm-slim");
            let fake = fake_host(move |c| {
                (c.op == failing).then(|| {
                    if failing == "debootstrap" {
                        let tree = PathBuf::from(&c.args[c.args.len() - 2]);
                        std::fs::create_dir_all(tree.join("boot")).unwrap();
                    }
                    Err(PrivError::failed(
                        &c.op,
                        1,
                        &["tar: ./usr/lib/x: Cannot write: No space left on device"],
                    ))
                })
            });
            let err = build(&req, &fake, &RecordingProgress::new())
                .await
                .unwrap_err();
            match &err {
                BuildError::DiskFull { path } => assert_eq!(path, &req.work_dir),
                other => panic!("{failing}: expected DiskFull, got {other}"),
            }
            assert!(err.hint().unwrap().starts_with("free some space"), "{err}");
        }
    }

    #[tokio::test]
    async fn missing_kernel_is_reported_with_a_hint() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let fake = fake_host(|c| (c.op == "debootstrap").then(|| Ok(PrivOutput::default())));
        let err = build(&req, &fake, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(matches!(err, BuildError::NoKernel { .. }), "{err}");
        assert!(err.hint().unwrap().contains("linux-image"), "{err}");
    }

    #[tokio::test]
    async fn too_small_filesystem_is_retried_once_bigger() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let attempts = Arc::new(AtomicUsize::new(0));
        let a = attempts.clone();
        let fake = fake_host(move |c| {
            (c.op == "mkfs.ext4" && a.fetch_add(1, Ordering::SeqCst) == 0).then(|| {
                Err(PrivError::failed(
                    &c.op,
                    1,
                    &["Could not allocate block in ext2 filesystem"],
                ))
            })
        });
        let out = build(&req, &fake, &RecordingProgress::new()).await.unwrap();
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert!(out.rootfs_size > size_for_tree(DU_BYTES, MiB(512)));
        assert_eq!(
            std::fs::metadata(&out.rootfs).unwrap().len(),
            out.rootfs_size
        );
    }

    #[tokio::test]
    async fn leftover_tree_is_removed_first_and_bad_mirror_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let mut req = request(dir.path(), "debian-bookworm-slim");
        std::fs::create_dir_all(req.work_dir.join("tree")).unwrap();
        let fake = fake_host(|_| None);
        build(&req, &fake, &RecordingProgress::new()).await.unwrap();
        assert_eq!(fake.ops()[..2], ["remove build tree", "debootstrap"]);

        req.mirror = "mirror.example/debian".into();
        let err = build(&req, &fake, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(matches!(err, BuildError::BadMirror(_)), "{err}");
    }

    #[tokio::test]
    async fn a_cancelled_build_runs_no_further_step_and_still_removes_its_tree() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        let cancel = req.cancel.clone();
        // The client goes away while the first chroot step runs.
        let fake = fake_host(move |c| {
            c.op.starts_with("write ").then(|| {
                cancel.cancel();
                Err(PrivError::Cancelled { op: c.op.clone() })
            })
        });
        let rec = RecordingProgress::new();
        let err = build(&req, &fake, &rec).await.unwrap_err();
        assert!(matches!(err, BuildError::Cancelled), "{err}");
        assert_eq!(err.to_string(), "the build was cancelled");
        let first_write = format!("write {}", req.recipe.files[0].path);
        assert_eq!(
            fake.ops(),
            ["debootstrap", &first_write, "remove build tree"]
        );
        assert_eq!(rec.phases().last().map(String::as_str), Some("clean up"));
    }

    #[tokio::test]
    async fn a_build_cancelled_before_it_starts_runs_nothing_but_the_clean_up() {
        let dir = tempfile::tempdir().unwrap();
        let req = request(dir.path(), "debian-bookworm-slim");
        std::fs::create_dir_all(req.work_dir.join("tree")).unwrap();
        req.cancel.cancel();
        let fake = fake_host(|_| None);
        let err = build(&req, &fake, &RecordingProgress::new())
            .await
            .unwrap_err();
        assert!(matches!(err, BuildError::Cancelled), "{err}");
        assert_eq!(fake.ops(), ["remove build tree", "remove build tree"]);
    }

    #[tokio::test]
    async fn cancelling_a_real_debootstrap_kills_it_and_its_children_and_unmounts_its_proc() {
        use crate::testproc::{
            alive, debootstrap_script, gone_within, mounted_under, pids_in, MountGuard, Reaper,
            StandIn,
        };

        let t = tempfile::tempdir().unwrap();
        let root = t.path().canonicalize().unwrap();
        let _mounts = MountGuard(root.clone());
        let reaper = Reaper::new();
        let pids = root.join("pids");
        let script = debootstrap_script(&root, &pids);
        let host = crate::privileged::HostPrivileged::detect().unwrap();
        let runner = StandIn {
            host,
            debootstrap: script,
        };
        let req = request(&root, "debian-bookworm-slim");
        let rec = RecordingProgress::new();
        let cancel = async {
            let p = pids_in(&pids).await;
            reaper.add(&p);
            // Its output streams while it runs.
            while !rec.logs().iter().any(|l| l == "I: Retrieving InRelease") {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert_eq!(mounted_under(&req.work_dir.join("tree")).len(), 1);
            req.cancel.cancel();
            p
        };
        let (result, p) = tokio::join!(build(&req, &runner, &rec), cancel);
        let err = result.unwrap_err();
        assert!(matches!(err, BuildError::Cancelled), "{err}");
        assert!(!alive(p[0]), "debootstrap ended before the build returned");
        gone_within(&p[1..], Duration::from_secs(2)).await;
        assert!(!req.work_dir.join("tree").exists(), "{:?}", rec.logs());
        assert!(mounted_under(&root).is_empty());
        assert!(
            rec.logs()
                .iter()
                .any(|l| l.starts_with("+ ") && l.contains("umount -l")),
            "{:?}",
            rec.logs()
        );
    }

    #[test]
    fn kernel_versions_sort_numerically() {
        let mut v = vec![
            "6.1.0-10-cloud-amd64",
            "6.1.0-9-cloud-amd64",
            "5.10.0-30-amd64",
        ];
        v.sort_by_key(|s| version_key(s));
        assert_eq!(
            v,
            [
                "5.10.0-30-amd64",
                "6.1.0-9-cloud-amd64",
                "6.1.0-10-cloud-amd64"
            ]
        );
    }
}
