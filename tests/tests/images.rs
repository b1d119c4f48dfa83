//! Images end to end: the real debootstrap build of the slim image, and bundle export/pull
//! round trips against a real HTTP server on 127.0.0.1, including refused downloads that must
//! leave the store exactly as it was.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test code: a panic is a failure

use std::process::Command;

use banger_e2e::*;

fn debugfs(image: &std::path::Path, request: &str) -> String {
    let out = Command::new("debugfs")
        .args(["-R", request])
        .arg(image)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn slim_image_build_is_a_clean_hardened_systemd_image() {
    if !e2e_enabled() {
        return;
    }
    let img = slim_image();
    let out = img
        .build_output
        .as_ref()
        .expect("the cache keeps the build's output");
    for phase in ["==> debootstrap", "==> make ext4"] {
        assert!(out.contains(phase), "build output lacks {phase:?}:\n{out}");
    }
    assert!(
        out.contains("built in"),
        "build output lacks the total time:\n{out}"
    );

    let fsck = Command::new("e2fsck")
        .arg("-fn")
        .arg(&img.rootfs)
        .output()
        .unwrap();
    assert!(
        fsck.status.success(),
        "e2fsck -fn is not clean:\n{}{}",
        String::from_utf8_lossy(&fsck.stdout),
        String::from_utf8_lossy(&fsck.stderr)
    );

    let sshd = debugfs(&img.rootfs, "cat /etc/ssh/sshd_config.d/10-banger.conf");
    for line in [
        "PermitRootLogin prohibit-password",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
    ] {
        assert!(
            sshd.contains(line),
            "hardened sshd config lacks {line:?}:\n{sshd}"
        );
    }
    let init = debugfs(&img.rootfs, "stat /sbin/init");
    assert!(
        init.contains("systemd"),
        "/sbin/init is not systemd:\n{init}"
    );
    let keys = debugfs(&img.rootfs, "ls -l /etc/ssh");
    assert!(
        !keys.contains("ssh_host_"),
        "image ships ssh host keys:\n{keys}"
    );

    // The kernel and initrd are in the kernel store, registered under the image's name.
    let env = Env::persistent(&img.home);
    let kernels = env.ok(["kernel", "list", "--json"]).json();
    let k = kernels
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["name"] == SLIM)
        .unwrap_or_else(|| panic!("kernel {SLIM} not in store: {kernels}"));
    assert_eq!(k["kernel"].as_str().unwrap(), img.kernel.to_str().unwrap());
    assert_eq!(k["initrd"].as_str().unwrap(), img.initrd.to_str().unwrap());
    assert!(std::fs::metadata(&img.kernel).unwrap().len() > 1 << 20);
    assert!(std::fs::metadata(&img.initrd).unwrap().len() > 1 << 20);
    let images = env.ok(["image", "list", "--json"]).json();
    assert_eq!(images[0]["name"], SLIM);
    assert_eq!(images[0]["source"], "built");
}

fn store_snapshot(env: &Env) -> (Vec<String>, String, String) {
    let state = env.state_dir();
    let mut files = tree_listing(&state.join("images"));
    files.extend(tree_listing(&state.join("kernels")));
    files.extend(tree_listing(&state.join("tmp")));
    let images = env.ok(["image", "list", "--json"]).stdout;
    let kernels = env.ok(["kernel", "list", "--json"]).stdout;
    (files, images, kernels)
}

fn image_json(env: &Env, name: &str) -> serde_json::Value {
    let all = env.ok(["image", "list", "--json"]).json();
    all.as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no image {name} in {all}"))
}

#[test]
fn bundle_round_trip_over_http_and_refused_downloads_leave_store_unchanged() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    register_slim(&env, "orig");
    let bundles = tempfile::tempdir().unwrap();
    let good = bundles.path().join("good");
    let out = env.ok([
        "image".as_ref(),
        "export".as_ref(),
        "orig".as_ref(),
        "-o".as_ref(),
        good.as_os_str(),
    ]);
    assert!(out.stdout.trim().ends_with("manifest.json"), "{out}");
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(good.join("manifest.json")).unwrap()).unwrap();
    let files = manifest["files"].as_array().unwrap();
    assert!(files.iter().any(|f| f["role"] == "rootfs"), "{manifest}");
    assert!(files.iter().any(|f| f["role"] == "initrd"), "{manifest}");
    let rootfs_entry = files
        .iter()
        .find(|f| f["role"] == "rootfs")
        .unwrap()
        .clone();
    let rootfs_file = rootfs_entry["path"].as_str().unwrap().to_owned();

    // A bundle with one flipped byte in its compressed rootfs.
    let bad = bundles.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    for f in std::fs::read_dir(&good).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), bad.join(f.file_name())).unwrap();
    }
    let mut bytes = std::fs::read(bad.join(&rootfs_file)).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(bad.join(&rootfs_file), bytes).unwrap();

    let server = HttpServer::serve(bundles.path());

    // The faults come first: a good pull would put the verified files into the download
    // cache (keyed by digest), where a later pull of the same manifest finds them.
    let before = store_snapshot(&env);

    // One flipped byte: refused, naming the file and both digests.
    let out = env.banger([
        "image",
        "pull",
        &server.url("bad/manifest.json"),
        "--name",
        "flipped",
    ]);
    assert_eq!(out.status, Some(71), "{out}");
    assert!(out.stderr.contains(&rootfs_file), "{out}");
    assert!(
        out.stderr
            .contains(rootfs_entry["sha256"].as_str().unwrap()),
        "{out}"
    );
    assert!(
        out.stderr.contains("expected sha256") && out.stderr.contains(", got "),
        "{out}"
    );
    assert_eq!(
        store_snapshot(&env),
        before,
        "store changed after a digest mismatch"
    );

    // A truncated download.
    server.fault(&format!("good/{rootfs_file}"), Some(Fault::Truncate(1000)));
    let out = env.banger([
        "image",
        "pull",
        &server.url("good/manifest.json"),
        "--name",
        "trunc",
    ]);
    assert_eq!(out.status, Some(71), "{out}");
    assert!(out.stderr.to_lowercase().contains("truncated"), "{out}");
    assert_eq!(
        store_snapshot(&env),
        before,
        "store changed after a truncated download"
    );

    // An HTTP error status.
    server.fault(&format!("good/{rootfs_file}"), Some(Fault::Status(500)));
    let out = env.banger([
        "image",
        "pull",
        &server.url("good/manifest.json"),
        "--name",
        "err",
    ]);
    assert_eq!(out.status, Some(71), "{out}");
    assert!(out.stderr.contains("500"), "{out}");
    assert_eq!(
        store_snapshot(&env),
        before,
        "store changed after an HTTP 500"
    );

    // `kernel pull` takes only the kernel and initrd: the failing rootfs is never asked for.
    let asked_before = server.requests(&format!("good/{rootfs_file}"));
    let out = env.banger([
        "kernel",
        "pull",
        &server.url("good/manifest.json"),
        "--name",
        "k-only",
    ]);
    assert_eq!(out.status, Some(0), "{out}");
    assert_eq!(out.stdout.trim(), "k-only");
    assert_eq!(
        server.requests(&format!("good/{rootfs_file}")),
        asked_before,
        "kernel pull fetched the rootfs"
    );
    let out = env.banger(["kernel", "pull", &server.url("good/manifest.json")]);
    assert_eq!(out.status, Some(2), "a URL needs --name: {out}");
    assert!(out.stderr.contains("--name"), "{out}");

    // After the faults clear, the same pull works (resuming the truncated part cleanly),
    // under a new name and with the same digests.
    server.fault(&format!("good/{rootfs_file}"), None);
    // Round trip: pull under a new name, same digests.
    env.ok([
        "image",
        "pull",
        &server.url("good/manifest.json"),
        "--name",
        "copy",
    ]);
    let (orig, copy) = (image_json(&env, "orig"), image_json(&env, "copy"));
    assert_eq!(orig["rootfs_sha256"], copy["rootfs_sha256"]);
    assert_eq!(copy["source"], "pulled");
    let kernels = env.ok(["kernel", "list", "--json"]).json();
    let digest = |name: &str, field: &str| {
        kernels
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name)
            .unwrap()[field]
            .clone()
    };
    assert_eq!(
        digest("orig", "kernel_sha256"),
        digest("copy", "kernel_sha256")
    );
    assert_eq!(
        digest("orig", "initrd_sha256"),
        digest("copy", "initrd_sha256")
    );
    assert_eq!(
        digest("orig", "kernel_sha256"),
        digest("k-only", "kernel_sha256")
    );
    assert_eq!(
        digest("orig", "initrd_sha256"),
        digest("k-only", "initrd_sha256")
    );
    assert_eq!(digest("k-only", "source"), "pulled");

    // A disk that fills up mid-pull: a second user whose state directory is a 64 MiB tmpfs.
    // The error says so, and nothing is left half-written in that store.
    let full = Env::new();
    let _small = TmpfsMount::new(&full.state_dir(), "64m");
    let out = full.banger([
        "image",
        "pull",
        &server.url("good/manifest.json"),
        "--name",
        "nospace",
    ]);
    assert_eq!(out.status, Some(71), "{out}");
    assert!(
        out.stderr.to_lowercase().contains("no space left") || out.stderr.contains("disk is full"),
        "{out}"
    );
    let images = full.ok(["image", "list", "--json"]).json();
    assert_eq!(images.as_array().map(Vec::len), Some(0), "{images}");
    for dir in ["tmp", "images", "kernels"] {
        let d = full.state_dir().join(dir);
        assert_eq!(
            tree_listing(&d),
            Vec::<String>::new(),
            "left in {}",
            d.display()
        );
    }
    full.stop_daemon();
}

/// A size-limited tmpfs mounted over `dir` for the length of a test; unmounted on drop.
struct TmpfsMount(std::path::PathBuf);

impl TmpfsMount {
    fn new(dir: &std::path::Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let st = std::process::Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .status()
            .unwrap();
        assert!(st.success(), "cannot mount a tmpfs on {}", dir.display());
        TmpfsMount(dir.to_owned())
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("--lazy")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn catalog_names_resolve_and_unknown_names_list_what_exists() {
    if !e2e_enabled() {
        return;
    }
    let env = Env::new();
    register_slim(&env, "orig");
    let dir = tempfile::tempdir().unwrap();
    env.ok([
        "image".as_ref(),
        "export".as_ref(),
        "orig".as_ref(),
        "-o".as_ref(),
        dir.path().join("b").as_os_str(),
    ]);
    let server = HttpServer::serve(dir.path());
    let catalog = dir.path().join("catalog.toml");
    std::fs::write(
        &catalog,
        format!(
            "[[image]]\nname = \"served\"\nkind = \"bundle\"\nmanifest_url = \"{}\"\n\
             [[image]]\nname = \"built\"\nkind = \"recipe\"\nrecipe = \"debian-bookworm-slim\"\n",
            server.url("b/manifest.json")
        ),
    )
    .unwrap();
    env.write_config(&format!("catalog_url = \"{}\"\n", catalog.display()));
    env.ok(["daemon", "restart"]);

    // Not in the catalog, and (upper case) not an OCI reference either, so nothing is asked
    // of any registry: a plain unknown name would be tried on Docker Hub.
    let out = env.banger(["image", "pull", "No-Such-Image"]);
    assert_eq!(out.status, Some(70), "{out}");
    assert!(
        out.stderr.contains("served"),
        "error should list the catalog: {out}"
    );

    env.ok(["image", "pull", "served"]);
    assert_eq!(
        image_json(&env, "served")["rootfs_sha256"],
        image_json(&env, "orig")["rootfs_sha256"]
    );

    // `kernel pull` by catalog name; an entry that is only a recipe has no kernel to pull.
    env.ok(["kernel", "pull", "served", "--name", "served-k"]);
    let out = env.banger(["kernel", "pull", "built"]);
    assert_eq!(out.status, Some(70), "{out}");
    assert!(out.stderr.contains("image build built"), "{out}");

    let out = env.banger(["image", "delete", "nope"]);
    assert_eq!(out.status, Some(70), "{out}");
    assert!(
        out.stderr.contains("orig"),
        "error should list existing images: {out}"
    );
    env.ok(["image", "delete", "served"]);
    assert!(!env.state_dir().join("images/served").exists());
}
