//! Host integration as a user sees it: shell completion with live names from the daemon (and
//! nothing, not file names, when it is down), the ssh-config block in ~/.ssh/config, and doctor.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::os::unix::fs::PermissionsExt;
use std::process::Command;

use banger_e2e::*;

/// Runs bash's completion for `banger <words...> <TAB>` and returns the non-flag candidates.
fn bash_complete(env: &Env, words: &[&str]) -> Vec<String> {
    let script = env.ok(["completion", "bash"]).stdout;
    let dir = tempfile::tempdir().unwrap();
    let script_path = dir.path().join("banger.bash");
    std::fs::write(&script_path, script).unwrap();
    // A file in the working directory that a file-name fallback would offer.
    std::fs::write(dir.path().join("web-file"), "").unwrap();
    let mut all: Vec<String> = vec!["banger".into()];
    all.extend(words.iter().map(|w| w.to_string()));
    let line = all.join(" ");
    let quoted: Vec<String> = all.iter().map(|w| format!("'{w}'")).collect();
    let program = format!(
        "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; \
         $(complete -p banger | sed -n 's/.*-F \\([^ ]*\\).*/\\1/p') banger '{}' '{}'; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        script_path.display(),
        quoted.join(" "),
        all.len() - 1,
        all.last().unwrap(),
        all[all.len() - 2],
    );
    let out = Command::new("bash")
        .arg("-c")
        .arg(program)
        .current_dir(dir.path())
        .env("HOME", env.home())
        .env_remove("XDG_RUNTIME_DIR")
        .env_remove("XDG_STATE_HOME")
        .env(
            "PATH",
            format!("{}:{}", bin_dir().display(), std::env::var("PATH").unwrap()),
        )
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| l.trim().to_owned())
        // Flags (`--help`, ...) are offered alongside names; the tests are about names.
        .filter(|l| !l.is_empty() && !l.starts_with('-'))
        .collect()
}

#[test]
fn bash_completes_live_vm_names_and_nothing_when_the_daemon_is_down() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::with_netns();
    register_slim(&env, "slim");
    env.ok(small_vm("web", "slim", &["--no-start"]));
    env.ok(small_vm("worker", "slim", &["--no-start"]));

    let subs = bash_complete(&env, &["vm", "ss"]);
    assert_eq!(subs, vec!["ssh"], "subcommand completion");
    let names = bash_complete(&env, &["vm", "ssh", ""]);
    assert!(
        names.contains(&"web".to_owned()) && names.contains(&"worker".to_owned()),
        "{names:?}"
    );
    let names = bash_complete(&env, &["vm", "ssh", "we"]);
    assert_eq!(names, vec!["web"]);
    let images = bash_complete(&env, &["image", "delete", ""]);
    assert_eq!(images, vec!["slim"]);

    env.stop_daemon();
    let names = bash_complete(&env, &["vm", "ssh", ""]);
    assert!(
        names.is_empty(),
        "with the daemon down names complete to nothing: {names:?}"
    );
    let names = bash_complete(&env, &["vm", "ssh", "we"]);
    assert!(names.is_empty(), "no file-name fallback: {names:?}");
    assert!(
        env.daemon_pid().is_none(),
        "completion must not start the daemon"
    );

    env.ok(["vm", "delete", "web"]);
    env.ok(["vm", "delete", "worker"]);
}

#[test]
fn ssh_config_install_is_idempotent_and_uninstall_restores_every_byte() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    let ssh = env.home().join(".ssh");
    std::fs::create_dir_all(&ssh).unwrap();
    let config = ssh.join("config");
    let original = b"# my settings\nHost github.com\n    User git\n\nHost *.corp\n    ProxyJump bastion # hop\n    ForwardAgent no";
    std::fs::write(&config, original).unwrap();
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o640)).unwrap();

    let printed = env.ok(["ssh-config"]).stdout;
    let include = format!("Include {}", env.config_dir().join("ssh_config").display());
    assert_eq!(printed.trim(), include);

    env.ok(["ssh-config", "--install"]);
    env.ok(["ssh-config", "--install"]);
    let text = std::fs::read_to_string(&config).unwrap();
    assert_eq!(text.matches(">>> banger >>>").count(), 1, "{text}");
    assert!(
        text.starts_with("# >>> banger >>>"),
        "the Include must come before any Host: {text}"
    );
    assert!(text.contains(&include), "{text}");
    assert!(text.contains("Host github.com"), "{text}");
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o640
    );

    env.ok(["ssh-config", "--uninstall"]);
    assert_eq!(
        std::fs::read(&config).unwrap(),
        original.to_vec(),
        "uninstall must restore the file byte for byte"
    );

    // No ~/.ssh/config at all: install creates it (0600), uninstall leaves an empty file.
    std::fs::remove_file(&config).unwrap();
    env.ok(["ssh-config", "--install"]);
    assert_eq!(
        std::fs::metadata(&config).unwrap().permissions().mode() & 0o777,
        0o600
    );
}

#[test]
fn doctor_reports_the_nested_kvm_mode_and_the_qemu_fallback() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    let out = env.banger(["doctor"]);
    let kvm_pvm = std::path::Path::new("/sys/module/kvm_pvm").exists();
    if kvm_pvm {
        assert!(out.stdout.contains("nested software mode"), "{out}");
        assert!(out.stdout.contains("QEMU (TCG)"), "{out}");
    }
    assert!(out.stdout.contains("vm_defaults:"), "{out}");
    let failed = out.stdout.contains("[FAIL]");
    assert_eq!(out.status, Some(if failed { 1 } else { 0 }), "{out}");
    let json = env.banger(["doctor", "--json"]).json();
    assert!(
        json["checks"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "kvm-mode"),
        "{json}"
    );
    assert!(json["vm_defaults"]["vcpu"]["source"].is_string(), "{json}");
}
