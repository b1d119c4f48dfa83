//! Snapshots from a real guest, in a private network namespace: a busybox VM on QEMU (TCG) is
//! snapshotted while it runs (QEMU saves through a file descriptor under its seccomp sandbox),
//! goes on running; two VMs made from the snapshot run at once, each with its own address, MAC,
//! name, machine-id, randomness and the host's clock; `vm fork` makes two children that have
//! the parent's file and running process; the snapshot is listed with its files and deleted
//! whole, and a snapshot whose image was deleted is refused. Warm starts: the first `vm run`
//! of an image boots and keeps a warm snapshot, the next ones restore it (each with a work
//! disk of its own), `--cold` boots, and a damaged snapshot is replaced by a cold boot that
//! says so.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::path::PathBuf;

use banger_e2e::oci::*;
use banger_e2e::*;

/// Small busybox guests on QEMU, with `top` (top-level keys) added.
fn config(top: &str) -> String {
    format!(
        "vmm = \"qemu\"\n{top}[vm_defaults]\nvcpu = 1\nmemory_mib = 256\ndisk_size = \"128M\"\n"
    )
}

#[test]
fn a_running_guest_is_snapshotted_and_runs_on() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::with_netns();
    // Snapshots taken by hand only: the warm-start test below has those.
    let _registry = pull_busybox(&env, &config("warm_starts = false\n"));
    env.ok(["vm", "create", "--image", "busybox", "--name", "bb"]);
    env.ok([
        "vm",
        "exec",
        "bb",
        "--",
        "sh",
        "-c",
        "echo before > /root/mark",
    ]);
    // A process that outlives its command, to be found running in the forks.
    env.ok([
        "vm",
        "exec",
        "bb",
        "--",
        "sh",
        "-c",
        "echo 'while :; do sleep 1; done' > /root/loop.sh; \
         setsid sh /root/loop.sh </dev/null >/dev/null 2>&1 &",
    ]);

    let out = env.ok(["vm", "snapshot", "bb", "--name", "base"]);
    assert_eq!(out.stdout.trim(), "base", "{out}");
    let list = env.ok(["snapshot", "list", "--json"]).json();
    let snap = &list[0];
    assert_eq!(snap["name"], "base", "{list}");
    assert_eq!(snap["vm"], "bb");
    assert_eq!(snap["vmm"], "qemu");
    let dir = PathBuf::from(snap["dir"].as_str().unwrap());
    for file in ["vm.state", "vm-snapshot.json", "root.ext4", "work.ext4"] {
        assert!(
            dir.join(file).is_file(),
            "{file} missing in {}",
            dir.display()
        );
    }
    // 256 MiB of guest memory, most of it never touched: the state is real but not huge.
    let state = std::fs::metadata(dir.join("vm.state")).unwrap().len();
    assert!(state > 1_000_000, "a state of {state} bytes");
    let table = env.ok(["snapshot", "list"]).stdout;
    assert!(
        table.contains("base") && table.contains("bb") && table.contains("qemu"),
        "{table}"
    );

    // The guest ran on: the same machine, its file still there, new commands answered.
    let out = env.ok(["vm", "exec", "bb", "--", "cat", "/root/mark"]);
    assert_eq!(out.stdout, "before\n");
    assert_eq!(
        env.ok(["vm", "show", "bb", "--json"]).json()["state"],
        "running"
    );

    // Two VMs from the snapshot, running at once, each its own machine: the file written
    // before the snapshot, but their own address, MAC, name, machine-id, randomness and clock.
    env.ok(["vm", "create", "--from", "base", "--name", "c1"]);
    env.ok(["vm", "create", "--from", "base", "--name", "c2"]);
    let facts = |vm: &str| -> Vec<String> {
        let out = env.ok([
            "vm",
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            "cat /root/mark; hostname; cat /etc/machine-id; \
             ip -o -4 addr show eth0 | awk '{print $4}'; cat /sys/class/net/eth0/address; \
             head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n'; echo; date +%s",
        ]);
        out.stdout.lines().map(str::to_owned).collect()
    };
    let (f1, f2) = (facts("c1"), facts("c2"));
    for (f, vm) in [(&f1, "c1"), (&f2, "c2")] {
        assert_eq!(f.len(), 7, "{vm}: {f:?}");
        assert_eq!(f[0], "before", "{vm} lost the file: {f:?}");
        assert_eq!(f[1], vm, "{f:?}");
        let show = env.ok(["vm", "show", vm, "--json"]).json();
        assert_eq!(
            f[3].split('/').next().unwrap(),
            show["ip"].as_str().unwrap(),
            "{f:?}"
        );
        assert_eq!(f[4], show["mac"].as_str().unwrap(), "{f:?}");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let guest: i64 = f[6].parse().unwrap();
        assert!(
            (now - guest).abs() <= 2,
            "{vm}'s clock is {} s off",
            now - guest
        );
    }
    for i in 2..6 {
        assert_ne!(f1[i], f2[i], "c1 and c2 share line {i}: {f1:?} {f2:?}");
    }
    // And each reaches the other by name (the bridge knows them by their own addresses).
    let ping = env.ok([
        "vm", "exec", "c1", "--", "ping", "-c", "1", "-W", "3", "c2.vm",
    ]);
    assert!(ping.stdout.contains("1 packets received"), "{ping}");
    // A fork: two children of the running VM, with its file and its process.
    let out = env.ok(["vm", "fork", "bb", "-n", "2"]);
    assert_eq!(out.stdout, "bb-1\nbb-2\n", "{out}");
    for kid in ["bb-1", "bb-2"] {
        let out = env.ok([
            "vm",
            "exec",
            kid,
            "--",
            "sh",
            "-c",
            "cat /root/mark; ps; hostname",
        ]);
        assert!(out.stdout.starts_with("before\n"), "{kid}: {out}");
        assert!(
            out.stdout.contains("sh /root/loop.sh"),
            "{kid} lost the process: {out}"
        );
        assert!(out.stdout.trim_end().ends_with(kid), "{out}");
    }
    assert_eq!(
        env.ok(["snapshot", "list", "--json"])
            .json()
            .as_array()
            .unwrap()
            .len(),
        1,
        "the fork's snapshot stayed"
    );
    // The snapshotted VM runs on beside them.
    assert_eq!(
        env.ok(["vm", "exec", "bb", "--", "hostname"]).stdout.trim(),
        "bb"
    );

    let err = env.banger(["vm", "snapshot", "bb", "--name", "base"]);
    assert!(
        !err.success() && err.stderr.contains("already exists"),
        "{err}"
    );
    for vm in ["bb", "c1", "c2", "bb-1", "bb-2"] {
        env.ok(["vm", "delete", vm, "--force"]);
    }
    // A snapshot outlives its image (it was taken by hand), but no VM is made from it then.
    env.ok(["image", "delete", "busybox"]);
    let err = env.banger(["vm", "create", "--from", "base", "--name", "orphan"]);
    assert!(
        !err.success() && err.stderr.contains("which is no longer here"),
        "{err}"
    );
    assert!(err.stderr.contains("snapshot delete"), "no hint: {err}");
    let vms = env.ok(["vm", "list", "--json"]).json();
    assert_eq!(vms, serde_json::json!([]), "a refused create left {vms}");
    env.ok(["snapshot", "delete", "base"]);
    assert!(!dir.exists(), "the snapshot's files stayed");
    assert_eq!(
        env.ok(["snapshot", "list", "--json"]).json(),
        serde_json::json!([])
    );
    env.stop_daemon();
}

#[test]
fn vm_run_starts_warm_from_a_snapshot_of_the_first_boot() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::with_netns();
    let _registry = pull_busybox(&env, &config(""));
    let run = |extra: &[&str]| {
        let mut args = vec!["vm", "run", "--image", "busybox", "--rm"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--", "true"]);
        env.ok(args)
    };

    // The first boots and keeps a warm snapshot: memory, devices and the root disk, no work
    // disk. It is listed, and counted in the image's space.
    let first = run(&[]);
    assert!(first.stderr.contains("(cold boot"), "{first}");
    assert!(first.stderr.contains("kept warm snapshot"), "{first}");
    let list = env.ok(["snapshot", "list", "--json"]).json();
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    let warm = &list[0];
    assert_eq!(warm["warm"], true, "{list}");
    assert_eq!(warm["image"], "busybox");
    let name = warm["name"].as_str().unwrap().to_owned();
    let dir = PathBuf::from(warm["dir"].as_str().unwrap());
    assert!(dir.join("vm.state").is_file() && dir.join("root.ext4").is_file());
    assert!(
        !dir.join("work.ext4").exists(),
        "a warm snapshot kept a work disk"
    );
    let images = env.ok(["image", "list", "--json"]).json();
    assert_eq!(
        images[0]["snapshot_bytes"].as_u64(),
        warm["bytes"].as_u64(),
        "{images}"
    );
    assert!(warm["bytes"].as_u64().unwrap() > 1_000_000, "{warm}");
    let table = env.ok(["snapshot", "list"]).stdout;
    assert!(table.contains("warm") && table.contains(&name), "{table}");

    // The second is restored from it.
    let second = run(&[]);
    assert!(
        second
            .stderr
            .contains(&format!("(warm start from snapshot {name}")),
        "{second}"
    );

    // Each VM started warm has a work disk of its own at /root: what one writes there the
    // next does not see, and the repo copied in lands on it.
    env.ok(["vm", "create", "--image", "busybox", "--name", "a"]);
    env.ok(["vm", "create", "--image", "busybox", "--name", "b"]);
    for vm in ["a", "b"] {
        let out = env.ok([
            "vm",
            "exec",
            vm,
            "--",
            "sh",
            "-c",
            "grep ' /root ' /proc/mounts; hostname",
        ]);
        assert!(out.stdout.starts_with("/dev/vdb /root ext4"), "{vm}: {out}");
        assert!(out.stdout.trim_end().ends_with(vm), "{vm}: {out}");
    }
    env.ok([
        "vm",
        "exec",
        "a",
        "--",
        "sh",
        "-c",
        "echo mine > /root/mine",
    ]);
    let out = env.banger(["vm", "exec", "b", "--", "cat", "/root/mine"]);
    assert!(!out.success(), "b sees a's file: {out}");
    let repo = tempfile::tempdir().unwrap();
    std::fs::write(repo.path().join("hello"), "warm world\n").unwrap();
    let out = env.ok([
        "vm",
        "run",
        "--image",
        "busybox",
        "--rm",
        "--no-git",
        repo.path().to_str().unwrap(),
        "--",
        "cat",
        "hello",
    ]);
    assert!(out.stderr.contains("(warm start"), "{out}");
    assert_eq!(out.stdout, "warm world\n", "{out}");

    // `--cold` boots and keeps nothing new.
    let cold = run(&["--cold"]);
    assert!(cold.stderr.contains("(cold boot"), "{cold}");
    assert!(!cold.stderr.contains("kept warm snapshot"), "{cold}");

    // A damaged state file: that VM boots cold, says why, and keeps a new snapshot that the
    // next one starts from.
    let state = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("vm.state"))
        .unwrap();
    state.set_len(4096).unwrap();
    drop(state);
    let damaged = run(&[]);
    assert!(
        damaged
            .stderr
            .contains(&format!("warm snapshot {name} could not be restored")),
        "{damaged}"
    );
    assert!(damaged.stderr.contains("(cold boot"), "{damaged}");
    assert!(damaged.stderr.contains("kept warm snapshot"), "{damaged}");
    assert!(!dir.exists(), "the damaged snapshot stayed");
    let again = run(&[]);
    assert!(
        again.stderr.contains("(warm start from snapshot warm-"),
        "{again}"
    );

    for vm in ["a", "b"] {
        env.ok(["vm", "delete", vm, "--force"]);
    }
    env.stop_daemon();
}
