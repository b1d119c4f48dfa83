//! `banger vm run` end to end on QEMU (TCG here), in a private network namespace: the
//! workspace copy follows git's rules exactly, statuses pass through, `--rm` leaves nothing,
//! branches, file_sync, config errors, and an interactive session through a pseudo-terminal.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use banger_e2e::*;

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "t")
        .env("GIT_AUTHOR_EMAIL", "t@example.invalid")
        .env("GIT_COMMITTER_NAME", "t")
        .env("GIT_COMMITTER_EMAIL", "t@example.invalid")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A repo with tracked, untracked, ignored (nested too), symlinked and executable files.
fn fixture(dir: &Path) -> std::path::PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let r = dir.join("fixture");
    std::fs::create_dir_all(r.join("sub/deeper")).unwrap();
    git(&r, &["init", "-q", "-b", "main"]);
    std::fs::write(r.join("README"), "v1\n").unwrap();
    std::fs::write(r.join(".gitignore"), "*.log\nbuild/\n").unwrap();
    git(&r, &["add", "."]);
    git(&r, &["commit", "-q", "-m", "one"]);
    std::fs::write(r.join("README"), "v2\n").unwrap();
    std::fs::write(r.join("run.sh"), "#!/bin/sh\necho run\n").unwrap();
    std::fs::set_permissions(r.join("run.sh"), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::os::unix::fs::symlink("README", r.join("link")).unwrap();
    std::fs::write(r.join("sub/.gitignore"), "secret.txt\n").unwrap();
    std::fs::write(r.join("sub/kept.txt"), "kept\n").unwrap();
    git(&r, &["add", "."]);
    git(&r, &["commit", "-q", "-m", "two"]);
    // Untracked but not ignored; ignored at three levels.
    std::fs::write(r.join("sub/deeper/untracked.txt"), "u\n").unwrap();
    std::fs::write(r.join("debug.log"), "ignored\n").unwrap();
    std::fs::write(r.join("sub/secret.txt"), "ignored\n").unwrap();
    std::fs::create_dir(r.join("build")).unwrap();
    std::fs::write(r.join("build/out"), "ignored\n").unwrap();
    std::fs::write(r.join(".git/info/exclude"), "local-only\n").unwrap();
    std::fs::write(r.join("local-only"), "ignored\n").unwrap();
    r
}

fn run_env() -> Env {
    let env = Env::with_netns();
    assert!(
        agent_bin().is_some(),
        "the static guest agent is missing: run `make agent`"
    );
    register_slim(&env, "slim");
    env
}

fn vm_count(env: &Env) -> usize {
    env.ok(["vm", "list", "--json"])
        .json()
        .as_array()
        .unwrap()
        .len()
}

#[test]
fn workspace_copy_matches_git_and_rm_leaves_nothing() {
    if !e2e_enabled() {
        return;
    }
    let env = run_env();
    env.write_config(
        "vmm = \"qemu\"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 512\ndisk_size = \"512M\"\n",
    );
    let tmp = tempfile::tempdir().unwrap();
    let repo = fixture(tmp.path());
    let check = "find . -path ./.git -prune -o -print | sort; echo MODE $(stat -c %a run.sh); \
                 echo LINK $(readlink link); echo STATUS; git status --porcelain; echo END";
    let out = env.ok([
        "vm".as_ref(),
        "run".as_ref(),
        repo.as_os_str(),
        "--image".as_ref(),
        "slim".as_ref(),
        "--rm".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        check.as_ref(),
    ]);
    let expected =
        ".\n./.gitignore\n./README\n./link\n./run.sh\n./sub\n./sub/.gitignore\n./sub/deeper\n\
                    ./sub/deeper/untracked.txt\n./sub/kept.txt\nMODE 755\nLINK README\nSTATUS\n";
    assert!(out.stdout.starts_with(expected), "{out}");
    // The host shows exactly one untracked entry; the guest must show the same.
    let host_status = git(&repo, &["status", "--porcelain"]);
    assert!(
        out.stdout.ends_with(&format!("STATUS\n{host_status}END\n")),
        "host:\n{host_status}\n{out}"
    );
    assert!(
        out.stderr
            .contains("spec: 1 vCPU (config), 512 MiB memory (config), 512M disk (config)"),
        "{out}"
    );
    assert_eq!(vm_count(&env), 0, "--rm leaves no VM");
    assert_eq!(
        tree_listing(&env.state_dir().join("vms")),
        Vec::<String>::new(),
        "--rm leaves no disk"
    );
    let ns = env.netns.as_ref().unwrap();
    let links = Command::new("ip")
        .args(["netns", "exec", &ns.name, "ip", "-o", "link"])
        .output()
        .unwrap();
    let links = String::from_utf8_lossy(&links.stdout);
    assert!(!links.contains(": bg-"), "--rm leaves no tap: {links}");

    // Exit status passes through; without --rm the VM stays.
    let out = env.banger([
        "vm".as_ref(),
        "run".as_ref(),
        repo.as_os_str(),
        "--image".as_ref(),
        "slim".as_ref(),
        "--name".as_ref(),
        "kept".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "exit 3".as_ref(),
    ]);
    assert_eq!(out.status, Some(3), "{out}");
    assert_eq!(vm_count(&env), 1);
    env.ok(["vm", "delete", "--force", "kept"]);

    // --branch feat --from HEAD~1
    let want = git(&repo, &["rev-parse", "HEAD~1"]);
    let out = env.ok([
        "vm".as_ref(),
        "run".as_ref(),
        repo.as_os_str(),
        "--image".as_ref(),
        "slim".as_ref(),
        "--rm".as_ref(),
        "--branch".as_ref(),
        "feat".as_ref(),
        "--from".as_ref(),
        "HEAD~1".as_ref(),
        "--".as_ref(),
        "sh".as_ref(),
        "-c".as_ref(),
        "git rev-parse --abbrev-ref HEAD; git rev-parse HEAD".as_ref(),
    ]);
    assert_eq!(out.stdout, format!("feat\n{want}"), "{out}");
    assert_eq!(vm_count(&env), 0);
}

#[test]
fn file_sync_config_errors_and_an_interactive_session() {
    if !e2e_enabled() {
        return;
    }
    let env = run_env();
    let host_files = tempfile::tempdir().unwrap();
    let h = host_files.path();
    std::fs::write(h.join("token"), "secret\n").unwrap();
    std::fs::create_dir_all(h.join("conf/nested")).unwrap();
    std::fs::write(h.join("conf/nested/a.toml"), "a = 1\n").unwrap();
    std::fs::write(h.join("script"), "#!/bin/sh\n").unwrap();
    let base = "vmm = \"qemu\"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 512\ndisk_size = \"512M\"\n";

    // Refused before anything is created, naming the key.
    for (guest, what) in [
        ("/etc/passwd", "outside /root"),
        ("~/../etc/passwd", "escape"),
    ] {
        env.write_config(&format!(
            "{base}[[file_sync]]\nhost = \"{}\"\nguest = \"{guest}\"\n",
            h.join("token").display()
        ));
        let out = env.banger(["vm", "run", "--image", "slim", "--", "true"]);
        assert_eq!(out.status, Some(2), "{what}: {out}");
        assert!(out.stderr.contains("file_sync[0].guest"), "{what}: {out}");
    }
    // Config errors name key and line.
    for (text, key, line) in [
        ("vmm = \"qemu\"\n[vm_defaults]\nvcpus = 1\n", "vcpus", 3),
        ("[vm_defaults]\ndisk_size = \"12Q\"\n", "disk_size", 2),
        ("[vm_defaults]\n\nvcpu = -2\n", "vcpu", 3),
    ] {
        env.write_config(text);
        let out = env.banger(["vm", "run", "--image", "slim", "--", "true"]);
        assert_eq!(out.status, Some(2), "{out}");
        assert!(
            out.stderr.contains(&format!("`{key}`"))
                && out.stderr.contains(&format!("config.toml:{line}")),
            "{out}"
        );
    }
    assert_eq!(vm_count(&env), 0);

    env.write_config(&format!(
        "{base}[[file_sync]]\nhost = \"{}\"\nguest = \"~/.config/token\"\n\n\
         [[file_sync]]\nhost = \"{}\"\nguest = \"/root/conf\"\n\n\
         [[file_sync]]\nhost = \"{}\"\nguest = \"~/bin/script\"\nmode = \"0755\"\n",
        h.join("token").display(),
        h.join("conf").display(),
        h.join("script").display()
    ));
    let out = env.ok([
        "vm",
        "run",
        "--image",
        "slim",
        "--rm",
        "--",
        "sh",
        "-c",
        "cat .config/token; cat conf/nested/a.toml; stat -c '%a %U' .config/token bin/script",
    ]);
    assert_eq!(out.stdout, "secret\na = 1\n600 root\n755 root\n", "{out}");

    // Interactive: a real pseudo-terminal, `echo hi; exit`, and the VM keeps running.
    env.write_config(base);
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave = std::fs::File::from(pty.slave);
    let mut cmd = env.cmd(["vm", "run", "--image", "slim", "--name", "inter"]);
    cmd.stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave));
    // SAFETY: setsid + TIOCSCTTY in the child make the pty its controlling terminal, as a shell would.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            nix::unistd::setsid().map_err(std::io::Error::from)?;
            if libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().unwrap();
    let mut master = std::fs::File::from(pty.master);
    nix::fcntl::fcntl(
        &master,
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let mut seen = String::new();
    assert!(
        read_until(&mut master, &mut seen, "is up at", 400),
        "VM did not come up:\n{seen}"
    );
    std::thread::sleep(Duration::from_secs(3));
    master.write_all(b"echo h''i; exit\n").unwrap();
    assert!(
        read_until(&mut master, &mut seen, "hi\r\n", 60),
        "no 'hi' from the session:\n{seen}"
    );
    assert!(
        read_until(&mut master, &mut seen, "still running", 60),
        "no hint after the session:\n{seen}"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "{seen}");
    let vm = env.ok(["vm", "show", "inter", "--json"]).json();
    assert_eq!(vm["state"], "running");
    env.ok(["vm", "delete", "--force", "inter"]);
}

/// Reads the pty into `seen` until it contains `needle` or `secs` pass.
fn read_until(master: &mut std::fs::File, seen: &mut String, needle: &str, secs: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(secs);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        match master.read(&mut buf) {
            Ok(n) if n > 0 => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
        if seen.contains(needle) {
            return true;
        }
    }
    false
}

#[test]
fn rm_keeps_a_vm_that_never_came_up_and_says_how_to_read_its_logs() {
    if !e2e_enabled() {
        return;
    }
    let env = run_env();
    env.write_config(
        "vmm = \"qemu\"\n[vm_defaults]\nvcpu = 1\nmemory_mib = 512\ndisk_size = \"256M\"\n",
    );
    // A daemon whose guests get 2 seconds to come up: far too little under TCG.
    env.stop_daemon();
    let mut cmd = env.cmd([
        "vm", "run", "--image", "slim", "--name", "slow", "--rm", "--", "true",
    ]);
    cmd.env("BANGER_BOOT_TIMEOUT", "2");
    let out = cmd.output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(73), "{stderr}");
    assert!(stderr.contains("banger vm logs slow"), "{stderr}");
    assert!(stderr.contains("console"), "{stderr}");
    let vm = env.ok(["vm", "show", "slow", "--json"]).json();
    assert_eq!(vm["name"], "slow", "--rm must keep a VM that never came up");
    env.ok(["vm", "delete", "--force", "slow"]);
    assert_eq!(vm_count(&env), 0);
}
