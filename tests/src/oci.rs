//! OCI fixtures for the end-to-end tests: a real registry (`docker-registry`, the CNCF
//! distribution registry from Debian) on loopback inside a test's network namespace, small test
//! images made offline from `busybox-static` with `umoci`, pushed with `skopeo`, and banger's
//! generic kernel fetched once per run.
//!
//! The registry gets its own config file and a temporary storage directory; the packaged
//! `/etc/docker/registry/config.yml` (which turns on htpasswd) is never used. Everything is
//! removed by drop guards, the registry process first.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

use crate::{target_dir, Env, Netns};

/// Fails with a clear message when a tool the OCI tests need is missing.
pub fn require_oci_tools() {
    for (tool, package) in [
        ("docker-registry", "docker-registry"),
        ("umoci", "umoci"),
        ("skopeo", "skopeo"),
        ("busybox", "busybox-static"),
    ] {
        assert!(
            crate::which(tool).is_some(),
            "the OCI end-to-end tests need `{tool}`: apt-get install {package} (`make test-deps` does it)"
        );
    }
}

/// A `docker-registry` serving on 127.0.0.1:PORT inside `netns` (or on the host's loopback).
pub struct Registry {
    pub port: u16,
    child: Child,
    netns: Option<String>,
    _dir: tempfile::TempDir,
}

impl Registry {
    /// Starts an anonymous registry; with `htpasswd` (user, password) it requires Basic auth.
    pub fn start(netns: Option<&Netns>, htpasswd: Option<(&str, &str)>) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("banger-e2e-registry-")
            .tempdir()
            .unwrap();
        let port = match netns {
            // A fresh namespace has nothing listening anywhere.
            Some(_) => 5000,
            None => free_port(),
        };
        let mut auth = String::new();
        if let Some((user, password)) = htpasswd {
            let out = Command::new("htpasswd")
                .args(["-nbB", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is needed for the auth tests");
            assert!(out.status.success(), "htpasswd failed");
            let file = dir.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).unwrap();
            auth = format!(
                "auth:\n  htpasswd:\n    realm: banger-test\n    path: {}\n",
                file.display()
            );
        }
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{auth}",
                dir.path().join("data").display()
            ),
        )
        .unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &ns.name, "docker-registry"]);
                c
            }
            None => Command::new("docker-registry"),
        };
        let child = cmd
            .arg("serve")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("cannot start docker-registry");
        let reg = Self {
            port,
            child,
            netns: netns.map(|n| n.name.clone()),
            _dir: dir,
        };
        reg.wait_up();
        reg
    }

    /// `127.0.0.1:PORT`, as image references name it.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn in_ns(&self, program: &str) -> Command {
        match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn wait_up(&self) {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let out = self
                .in_ns("busybox")
                .args(["wget", "-q", "-O", "/dev/null"])
                .arg(format!("http://{}/v2/", self.host()))
                .output();
            // An auth-only registry answers /v2/ with 401, which wget reports as a failure.
            let up = out.is_ok_and(|o| {
                o.status.success() || String::from_utf8_lossy(&o.stderr).contains("401")
            });
            if up {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "docker-registry did not come up:\n{}",
                std::fs::read_to_string(self._dir.path().join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pushes the OCI layout `layout:tag` as `REPO` (e.g. `test/busybox:1`).
    pub fn push(&self, layout: &Path, tag: &str, repo: &str, creds: Option<(&str, &str)>) {
        let mut c = self.in_ns("skopeo");
        c.args(["copy", "-q", "--dest-tls-verify=false"]);
        if let Some((u, p)) = creds {
            c.arg(format!("--dest-creds={u}:{p}"));
        }
        let out = c
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo}", self.host()))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "skopeo copy to the test registry failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An OCI image layout built by a test; removed on drop.
pub struct TestImage {
    pub layout: PathBuf,
    pub tag: String,
    _dir: tempfile::TempDir,
}

/// A busybox image without systemd or sshd, in two layers: the first has busybox, its applet
/// links, `/etc/passwd` and `/etc/group`, a file to be deleted and one to be replaced; the
/// second deletes and replaces them. The config sets `Env` (FOO=bar, a PATH) and `WorkingDir`
/// (/srv, which exists). `extra` adds files (path, content) to the second layer.
pub fn busybox_image(extra: &[(&str, &str)]) -> TestImage {
    let dir = tempfile::Builder::new()
        .prefix("banger-e2e-oci-")
        .tempdir()
        .unwrap();
    let layout = dir.path().join("layout");
    let tag = "1".to_string();
    let image = format!("{}:{tag}", layout.display());
    run(Command::new("umoci")
        .args(["init", "--layout"])
        .arg(&layout));
    run(Command::new("umoci").args(["new", "--image", &image]));
    let bundle = dir.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    let root = bundle.join("rootfs");
    for d in ["bin", "etc", "srv", "tmp", "root", "var/lib/gone"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = crate::which("busybox").expect("busybox-static");
    std::fs::copy(&busybox, root.join("bin/busybox")).unwrap();
    let applets = Command::new(&busybox).arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&applets.stdout).lines() {
        let link = root.join("bin").join(applet);
        if applet != "busybox" && !link.exists() {
            std::os::unix::fs::symlink("busybox", link).unwrap();
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nnogroup:x:65534:\n").unwrap();
    std::fs::write(root.join("var/lib/gone/file"), "deleted by layer 2\n").unwrap();
    std::fs::write(root.join("etc/motd"), "layer 1\n").unwrap();
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    // The second layer is the difference against a fresh unpack of the first (repacking the
    // same bundle again would make it a full copy, without whiteouts).
    std::fs::remove_dir_all(&bundle).unwrap();
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle));
    std::fs::remove_dir_all(root.join("var/lib/gone")).unwrap();
    std::fs::write(root.join("etc/motd"), "layer 2\n").unwrap();
    for (path, content) in extra {
        let p = root.join(path.trim_start_matches('/'));
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle));
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.env",
        "FOO=bar",
        "--config.env",
        "PATH=/bin:/usr/bin",
        "--config.workingdir",
        "/srv",
    ]));
    run(Command::new("umoci").args(["gc", "--layout"]).arg(&layout));
    TestImage {
        layout,
        tag,
        _dir: dir,
    }
}

/// banger's generic kernel (Debian's cloud kernel with banger's modules initramfs), fetched once
/// per `target/` with `banger kernel pull generic` outside any network namespace (it downloads
/// from the Debian package registry, like the slim image build).
pub struct GenericKernel {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
}

pub fn generic_kernel() -> &'static GenericKernel {
    static KERNEL: OnceLock<GenericKernel> = OnceLock::new();
    static FETCHING: Mutex<()> = Mutex::new(());
    if let Some(k) = KERNEL.get() {
        return k;
    }
    let _guard = FETCHING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(k) = KERNEL.get() {
        return k;
    }
    let cache = target_dir()
        .join("banger-test-cache")
        .join("generic-kernel");
    std::fs::create_dir_all(&cache).unwrap();
    let lock = std::fs::File::create(cache.join("lock")).unwrap();
    let _flock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();
    let home = cache.join("home");
    let done = cache.join("complete");
    if !done.exists() {
        let _ = std::fs::remove_dir_all(&home);
        let env = Env::persistent(&home);
        let out = env.banger(["kernel", "pull", "generic"]);
        if !out.success() {
            drop(env);
            let _ = std::fs::remove_dir_all(&home);
            panic!("fetching banger's generic kernel failed:\n{out}");
        }
        drop(env);
        std::fs::write(&done, "").unwrap();
    }
    // Each version of the generic kernel has its own directory, `generic@SHA12`.
    let kernels = home.join(".local/state/banger/kernels");
    let dir = std::fs::read_dir(&kernels)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("generic@"))
        })
        .unwrap_or_else(|| panic!("no generic kernel in {}", kernels.display()));
    KERNEL.get_or_init(|| GenericKernel {
        kernel: dir.join("vmlinuz"),
        initrd: dir.join("initrd.img"),
    })
}

/// Registers the shared generic kernel into `env`'s store as `generic`, so OCI pulls in a
/// network namespace need no download.
pub fn register_generic_kernel(env: &Env) {
    let k = generic_kernel();
    env.ok([
        "kernel".as_ref(),
        "register".as_ref(),
        "generic".as_ref(),
        "--kernel".as_ref(),
        k.kernel.as_os_str(),
        "--initrd".as_ref(),
        k.initrd.as_os_str(),
    ]);
}

/// What the busybox guest tests share: checks that the static agent and the OCI tools are
/// there, writes `config`, registers the generic kernel (which starts the daemon: anything the
/// daemon must find, a resolv.conf say, goes in place before this), and pulls the busybox test
/// image from a registry in `env`'s namespace as `busybox`. The registry is returned: it lives
/// as long as the test holds it.
pub fn pull_busybox(env: &Env, config: &str) -> Registry {
    assert!(
        crate::agent_bin().is_some(),
        "the static guest agent is missing: run `make agent` (make test does)"
    );
    require_oci_tools();
    env.write_config(config);
    register_generic_kernel(env);
    let registry = Registry::start(env.netns.as_ref(), None);
    let image = busybox_image(&[]);
    registry.push(&image.layout, &image.tag, "test/busybox:1", None);
    let reference = format!("{}/test/busybox:1", registry.host());
    env.ok(["image", "pull", &reference, "--name", "busybox"]);
    registry
}
