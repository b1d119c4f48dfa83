//! The daemon's life as a user sees it: started on first use, reused, restarted after a crash,
//! private to its user, and refusing a CLI that speaks another API version.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use banger_e2e::*;

fn alive(pid: i32) -> bool {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[test]
fn second_call_reuses_the_daemon_and_kill_9_is_recovered() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    env.ok(["image", "list"]);
    let first = env.daemon_pid().expect("daemon answers after first call");
    env.ok(["image", "list"]);
    assert_eq!(
        env.daemon_pid(),
        Some(first),
        "second call started another daemon"
    );

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first), nix::sys::signal::SIGKILL).unwrap();
    while alive(first) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(
        env.socket().exists(),
        "a killed daemon leaves its socket behind"
    );
    env.ok(["image", "list"]);
    let second = env.daemon_pid().expect("a new daemon answers");
    assert_ne!(second, first);
    assert!(alive(second));

    let status = env.ok(["daemon", "status"]);
    assert!(status.stdout.contains(&second.to_string()), "{status}");
    env.ok(["daemon", "stop"]);
    assert!(!env.socket().exists(), "stop removes the socket");
    let mut c = env.cmd(["daemon", "status"]);
    c.env("BANGER_NO_AUTOSTART", "1");
    let out = c.output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(3),
        "status of a stopped daemon exits 3"
    );
}

/// A throwaway system user, removed on drop.
struct TempUser(String);

impl TempUser {
    fn new() -> Self {
        let name = format!("bgtest{}", std::process::id());
        let ok = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                &name,
            ])
            .status()
            .unwrap()
            .success();
        assert!(ok, "useradd {name} failed");
        Self(name)
    }
}

impl Drop for TempUser {
    fn drop(&mut self) {
        let _ = Command::new("userdel").arg(&self.0).status();
    }
}

#[test]
fn socket_is_private_to_its_user() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    env.ok(["image", "list"]);
    let sock = env.socket();
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode is {mode:o}");
    let dir_mode = std::fs::metadata(sock.parent().unwrap())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(dir_mode, 0o700, "socket dir mode is {dir_mode:o}");

    // Open every directory above the runtime dir so only banger's own modes stand in the way.
    let mut p = sock.parent().unwrap().parent().unwrap().to_owned();
    while p.starts_with(env.home()) {
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o711)).unwrap();
        if !p.pop() {
            break;
        }
    }
    let user = TempUser::new();
    let out = Command::new("runuser")
        .args(["-u", &user.0, "--"])
        .arg(bin("banger"))
        .args(["daemon", "status"])
        .env("HOME", "/nonexistent")
        .env("BANGER_SOCKET", &sock)
        .env("BANGER_NO_AUTOSTART", "1")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "other user got: {stderr}");
    assert!(
        stderr.to_lowercase().contains("permission denied"),
        "{stderr}"
    );
}

#[test]
fn mismatched_api_version_is_refused_with_restart_hint() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    env.ok(["image", "list"]);
    let mut s = std::os::unix::net::UnixStream::connect(env.socket()).unwrap();
    s.write_all(
        b"GET /v1/images HTTP/1.1\r\nHost: bangerd\r\nx-banger-api-version: 999\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 412"), "{resp}");
    assert!(resp.contains("api_version_mismatch"), "{resp}");
    assert!(resp.contains("banger daemon restart"), "{resp}");
}
