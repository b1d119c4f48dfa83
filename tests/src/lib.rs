//! Harness for banger's end-to-end tests: run the real `banger` and `bangerd` binaries the way a
//! user does, each test with its own temporary HOME (so its own daemon, store and socket) and,
//! when it touches networking or VMs, its own network namespace.
//!
//! Everything a test creates is owned by a guard whose `Drop` removes it, even when the test
//! panics: the daemon (stopped, then killed), every process left in the namespace, the namespace
//! itself and the temporary directories. The slim Debian image is built once per recipe version
//! and shared through a cache under `target/` (see [`slim_image`]); a cold cache builds it.
//!
//! These tests need root, debootstrap and QEMU. When those are missing they fail with a message
//! saying what to install; only `BANGER_E2E_SKIP=1`, which a developer sets by hand, skips them.
#![allow(clippy::unwrap_used, clippy::expect_used)] // a test harness: panicking is how it fails

use std::ffi::OsStr;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use nix::fcntl::{Flock, FlockArg};

pub mod oci;

/// Directory holding the workspace's built binaries (`target/debug`).
pub fn bin_dir() -> PathBuf {
    // Test binaries live in target/debug/deps; the workspace binaries one level up.
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(Path::parent).unwrap().to_owned()
}

pub fn bin(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is missing: build the workspace binaries first (`cargo build --workspace --bins`, which `make test` does)",
        p.display()
    );
    p
}

/// The workspace's `target` directory.
pub fn target_dir() -> PathBuf {
    bin_dir().parent().unwrap().to_owned()
}

/// Checks that end-to-end tests can run here. Returns false only when a developer opted out
/// with `BANGER_E2E_SKIP=1`; otherwise a missing prerequisite fails the test loudly.
pub fn e2e_enabled() -> bool {
    if std::env::var_os("BANGER_E2E_SKIP").is_some_and(|v| v == "1") {
        eprintln!("SKIPPED: BANGER_E2E_SKIP=1 is set (developer opt-out; CI never sets it)");
        return false;
    }
    assert!(
        nix::unistd::geteuid().is_root(),
        "end-to-end tests must run as root (they create network namespaces, taps and VMs); \
         run `sudo make test`, or set BANGER_E2E_SKIP=1 to skip them on a developer machine"
    );
    for (tool, package) in [
        ("debootstrap", "debootstrap"),
        ("qemu-system-x86_64", "qemu-system-x86"),
        ("mkfs.ext4", "e2fsprogs"),
        ("debugfs", "e2fsprogs"),
        ("ip", "iproute2"),
        ("nft", "nftables"),
        ("zstd", "zstd"),
    ] {
        assert!(
            which(tool).is_some(),
            "end-to-end tests need `{tool}`: apt-get install {package} (`make test-deps` does it)"
        );
    }
    true
}

pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/sbin".into()])
        .map(|d| d.join(tool))
        .find(|p| p.is_file())
}

/// Output of a command, with helpers that print everything on failure.
#[derive(Debug)]
pub struct Out {
    pub status: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl Out {
    fn from(o: Output) -> Self {
        Self {
            status: o.status.code(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
    pub fn success(&self) -> bool {
        self.status == Some(0)
    }
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}):\n{self}"))
    }
}

impl std::fmt::Display for Out {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit status: {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.status, self.stdout, self.stderr
        )
    }
}

static NETNS_SEQ: AtomicU32 = AtomicU32::new(0);

/// A network namespace owned by one test; removed (with every process in it) on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new() -> Self {
        let name = format!(
            "banger-e2e-{}-{}",
            std::process::id(),
            NETNS_SEQ.fetch_add(1, Ordering::SeqCst)
        );
        run_ok(Command::new("ip").args(["netns", "add", &name]));
        let ns = Self { name };
        run_ok(
            Command::new("ip").args(["netns", "exec", &ns.name, "ip", "link", "set", "lo", "up"]),
        );
        ns
    }

    /// Wraps a command so it runs inside this namespace.
    pub fn wrap(&self, program: &Path) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    pub fn pids(&self) -> Vec<i32> {
        let out = Command::new("ip")
            .args(["netns", "pids", &self.name])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default();
        out.split_whitespace()
            .filter_map(|p| p.parse().ok())
            .collect()
    }

    pub fn exists(name: &str) -> bool {
        Path::new("/run/netns").join(name).exists()
    }

    /// Gives processes started in this namespace their own /etc/resolv.conf (`ip netns exec`
    /// bind-mounts /etc/netns/NAME/resolv.conf over it). Call before starting them; removed on drop.
    pub fn set_resolv_conf(&self, text: &str) {
        let dir = self.etc_dir();
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("resolv.conf"), text).unwrap();
    }

    fn etc_dir(&self) -> PathBuf {
        Path::new("/etc/netns").join(&self.name)
    }
}

impl Default for Netns {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for pid in self.pids() {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.pids().is_empty() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
        let _ = std::fs::remove_dir_all(self.etc_dir());
    }
}

fn run_ok(cmd: &mut Command) -> Out {
    let out = Out::from(
        cmd.output()
            .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}")),
    );
    assert!(out.success(), "{cmd:?} failed:\n{out}");
    out
}

/// One user's banger: a HOME of its own (hence its own daemon and store), optionally in a netns.
pub struct Env {
    home: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    pub netns: Option<Netns>,
}

impl Env {
    /// A fresh temporary HOME, no network namespace.
    pub fn new() -> Self {
        let tmp = tempfile::Builder::new()
            .prefix("banger-e2e-")
            .tempdir()
            .unwrap();
        Self {
            home: tmp.path().to_owned(),
            _tmp: Some(tmp),
            netns: None,
        }
    }

    /// A fresh temporary HOME whose daemon and CLI run in a new network namespace.
    pub fn with_netns() -> Self {
        let mut env = Self::new();
        env.netns = Some(Netns::new());
        env
    }

    /// An env over a HOME that outlives the test (the image cache).
    pub fn persistent(home: &Path) -> Self {
        std::fs::create_dir_all(home).unwrap();
        Self {
            home: home.to_owned(),
            _tmp: None,
            netns: None,
        }
    }

    pub fn home(&self) -> &Path {
        &self.home
    }
    pub fn state_dir(&self) -> PathBuf {
        self.home.join(".local/state/banger")
    }
    pub fn config_dir(&self) -> PathBuf {
        self.home.join(".config/banger")
    }
    pub fn socket(&self) -> PathBuf {
        self.state_dir().join("run/bangerd.sock")
    }

    pub fn write_config(&self, text: &str) {
        std::fs::create_dir_all(self.config_dir()).unwrap();
        std::fs::write(self.config_dir().join("config.toml"), text).unwrap();
    }

    /// `banger ARGS` as a configured Command (not yet run).
    pub fn cmd<I, S>(&self, args: I) -> Command
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let banger = bin("banger");
        let mut c = match &self.netns {
            Some(ns) => ns.wrap(&banger),
            None => Command::new(&banger),
        };
        c.args(args)
            .env("HOME", &self.home)
            .env_remove("XDG_CONFIG_HOME")
            .env_remove("XDG_STATE_HOME")
            .env_remove("XDG_CACHE_HOME")
            .env_remove("XDG_RUNTIME_DIR")
            .env_remove("BANGER_SOCKET")
            .env_remove("BANGER_NO_AUTOSTART")
            .env("BANGER_DAEMON_BIN", bin("bangerd"))
            .env("NO_COLOR", "1")
            .stdin(Stdio::null());
        if let Some(agent) = agent_bin() {
            c.env("BANGER_AGENT_BIN", agent);
        }
        c
    }

    /// Runs `banger ARGS` and returns what it printed, whatever its status.
    pub fn banger<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S>,
        S: AsRef<OsStr>,
    {
        let mut c = self.cmd(args);
        Out::from(c.output().unwrap())
    }

    /// Runs `banger ARGS` and asserts it succeeded.
    pub fn ok<I, S>(&self, args: I) -> Out
    where
        I: IntoIterator<Item = S> + Clone + std::fmt::Debug,
        S: AsRef<OsStr>,
    {
        let shown = format!("{args:?}");
        let out = self.banger(args);
        assert!(out.success(), "banger {shown} failed:\n{out}");
        out
    }

    /// The pid of this env's daemon, if one answers.
    pub fn daemon_pid(&self) -> Option<i32> {
        let mut c = self.cmd(["daemon", "status", "--json"]);
        c.env("BANGER_NO_AUTOSTART", "1");
        let out = Out::from(c.output().ok()?);
        let v: serde_json::Value = serde_json::from_str(&out.stdout).ok()?;
        v["daemon"]["pid"]
            .as_i64()
            .and_then(|p| i32::try_from(p).ok())
    }

    /// Stops this env's daemon and makes sure it is gone.
    pub fn stop_daemon(&self) {
        let pid = self.daemon_pid();
        let _ = self.cmd(["daemon", "stop"]).output();
        if let Some(pid) = pid {
            let pid = nix::unistd::Pid::from_raw(pid);
            let deadline = Instant::now() + Duration::from_secs(10);
            while nix::sys::signal::kill(pid, None).is_ok() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::SIGKILL);
        }
    }
}

impl Default for Env {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        self.stop_daemon();
    }
}

/// The statically linked guest agent built by `make agent`, if present.
pub fn agent_bin() -> Option<PathBuf> {
    let p = target_dir().join("agent/x86_64-unknown-linux-gnu/debug/banger-agent");
    p.is_file().then_some(p)
}

/// The slim Debian image, built once per recipe version and shared by every test.
pub struct SlimImage {
    /// HOME of the banger that built it (its store holds the image).
    pub home: PathBuf,
    pub rootfs: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// What `banger image build` printed when the cached image was built (progress, total time).
    pub build_output: Option<String>,
}

pub const SLIM: &str = "debian-bookworm-slim";

/// Builds (or finds in the cache) the slim image with `banger image build debian-bookworm-slim`.
///
/// The cache lives under `target/banger-test-cache/` keyed by the recipe's digest, so a fresh
/// clone (as in CI) always builds it once, and a changed recipe is rebuilt. A file lock makes
/// concurrent test processes wait for one build.
pub fn slim_image() -> &'static SlimImage {
    static IMAGE: OnceLock<SlimImage> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    if let Some(img) = IMAGE.get() {
        return img;
    }
    let _guard = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(img) = IMAGE.get() {
        return img;
    }
    let recipe = banger_image::recipe::builtin(SLIM).expect("slim recipe is built in");
    let key = recipe.digest().to_string();
    let cache = target_dir()
        .join("banger-test-cache")
        .join(format!("slim-{}", &key[..16]));
    std::fs::create_dir_all(&cache).unwrap();
    let lock = File::create(cache.join("lock")).unwrap();
    let _flock = Flock::lock(lock, FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .unwrap();

    let home = cache.join("home");
    let done = cache.join("complete");
    if !done.exists() || !cache.join("build-output.txt").exists() {
        let _ = std::fs::remove_dir_all(&home);
        let env = Env::persistent(&home);
        let started = Instant::now();
        let out = env.banger(["image", "build", SLIM]);
        if !out.success() {
            drop(env);
            let _ = std::fs::remove_dir_all(&home);
            panic!("building the slim test image failed:\n{out}");
        }
        eprintln!("built {SLIM} in {:.0?}", started.elapsed());
        drop(env);
        std::fs::write(cache.join("build-output.txt"), &out.stderr).unwrap();
        std::fs::write(&done, &key).unwrap();
    }
    // What the build printed, kept with the cache so any test process can check it.
    let build_output = std::fs::read_to_string(cache.join("build-output.txt")).ok();
    let state = home.join(".local/state/banger");
    let img = SlimImage {
        rootfs: state.join("images").join(SLIM).join("rootfs.ext4"),
        kernel: state.join("kernels").join(SLIM).join("vmlinuz"),
        initrd: state.join("kernels").join(SLIM).join("initrd.img"),
        home,
        build_output,
    };
    IMAGE.get_or_init(|| img)
}

/// sha256 of a file, hex.
pub fn sha256_file(path: &Path) -> String {
    use sha2::Digest;
    let mut f = File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let mut h = sha2::Sha256::new();
    std::io::copy(&mut f, &mut h).unwrap();
    hex::encode(h.finalize())
}

/// Every file under `dir`, relative, sorted (for "store unchanged" assertions).
pub fn tree_listing(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for e in entries.flatten() {
            let p = e.path();
            let rel = p.strip_prefix(base).unwrap().display().to_string();
            if p.is_dir() {
                out.push(format!("{rel}/"));
                walk(base, &p, out);
            } else {
                out.push(rel);
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

/// What the test HTTP server does wrong for one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answer with this status and a short body.
    Status(u16),
    /// Promise the whole file in Content-Length, send only this many bytes, then hang up.
    Truncate(u64),
}

/// A small real HTTP/1.1 file server on 127.0.0.1 (GET, Range) with injectable faults.
pub struct HttpServer {
    pub port: u16,
    faults: std::sync::Arc<Mutex<std::collections::HashMap<String, Fault>>>,
    /// Requests served so far, by path.
    hits: std::sync::Arc<Mutex<std::collections::HashMap<String, usize>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HttpServer {
    pub fn serve(root: &Path) -> Self {
        use std::io::{BufRead, BufReader, Read, Seek, Write};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let faults: std::sync::Arc<Mutex<std::collections::HashMap<String, Fault>>> =
            Default::default();
        let hits: std::sync::Arc<Mutex<std::collections::HashMap<String, usize>>> =
            Default::default();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (root, f2, h2, s2) = (root.to_owned(), faults.clone(), hits.clone(), stop.clone());
        let handle = move |stream: std::net::TcpStream| -> std::io::Result<()> {
            stream.set_nonblocking(false)?;
            let mut reader = BufReader::new(stream.try_clone()?);
            let mut line = String::new();
            reader.read_line(&mut line)?;
            let path = line.split_whitespace().nth(1).unwrap_or("/").to_owned();
            let mut range_start = None;
            loop {
                let mut h = String::new();
                if reader.read_line(&mut h)? == 0 || h == "\r\n" {
                    break;
                }
                let lower = h.to_ascii_lowercase();
                if let Some(r) = lower.strip_prefix("range: bytes=") {
                    range_start = r.trim().trim_end_matches('-').parse::<u64>().ok();
                }
            }
            let mut out = stream;
            *h2.lock().unwrap().entry(path.clone()).or_default() += 1;
            let fault = f2.lock().unwrap().get(&path).copied();
            if let Some(Fault::Status(code)) = fault {
                let body = format!("injected failure {code}\n");
                write!(out, "HTTP/1.1 {code} Injected\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len())?;
                return Ok(());
            }
            let file = root.join(path.trim_start_matches('/'));
            let Ok(mut f) = File::open(&file) else {
                write!(
                    out,
                    "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                )?;
                return Ok(());
            };
            let len = f.metadata()?.len();
            let start = range_start.filter(|s| *s < len).unwrap_or(0);
            if start > 0 {
                f.seek(std::io::SeekFrom::Start(start))?;
                write!(out, "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {start}-{}/{len}\r\nConnection: close\r\n\r\n", len - start, len - 1)?;
            } else {
                write!(
                    out,
                    "HTTP/1.1 200 OK\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
                )?;
            }
            let limit = match fault {
                Some(Fault::Truncate(n)) => n.min(len - start),
                _ => len - start,
            };
            std::io::copy(&mut f.take(limit), &mut out)?;
            Ok(())
        };
        let thread = std::thread::spawn(move || {
            while !s2.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let h = handle.clone();
                        std::thread::spawn(move || {
                            let _ = h(stream);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self {
            port,
            faults,
            hits,
            stop,
            thread: Some(thread),
        }
    }

    /// How many requests for `path` (relative to the served root) arrived so far.
    pub fn requests(&self, path: &str) -> usize {
        let key = format!("/{}", path.trim_start_matches('/'));
        self.hits.lock().unwrap().get(&key).copied().unwrap_or(0)
    }

    pub fn url(&self, path: &str) -> String {
        format!(
            "http://127.0.0.1:{}/{}",
            self.port,
            path.trim_start_matches('/')
        )
    }

    pub fn fault(&self, path: &str, fault: Option<Fault>) {
        let key = format!("/{}", path.trim_start_matches('/'));
        let mut faults = self.faults.lock().unwrap();
        match fault {
            Some(f) => faults.insert(key, f),
            None => faults.remove(&key),
        };
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Registers the shared slim image into `env`'s store under `name`.
pub fn register_slim(env: &Env, name: &str) {
    let img = slim_image();
    env.ok([
        "image".as_ref(),
        "register".as_ref(),
        OsStr::new(name),
        "--rootfs".as_ref(),
        img.rootfs.as_os_str(),
        "--kernel".as_ref(),
        img.kernel.as_os_str(),
        "--initrd".as_ref(),
        img.initrd.as_os_str(),
    ]);
}

/// `vm create` arguments for a small test VM (1 vCPU, 512 MiB, 256M work disk) from `image`,
/// followed by `extra` (e.g. `--no-start`).
pub fn small_vm<'a>(name: &'a str, image: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec![
        "vm", "create", "--name", name, "--image", image, "--vcpu", "1", "--memory", "512",
        "--disk", "256M",
    ];
    args.extend_from_slice(extra);
    args
}
