//! Registry credentials from Docker's `config.json`, the file `docker login` writes.
//!
//! Order, as Docker: `credHelpers[registry]` (run `docker-credential-NAME get`), then an inline
//! `auths` entry (`auth` = base64 `user:password`, or `username` + `password`), then `credsStore`
//! (the same helper protocol). A helper that answers "credentials not found" means anonymous.
//! `auths` keys are matched by host, so `https://index.docker.io/v1/`, `index.docker.io`,
//! `registry-1.docker.io` and `docker.io` all name Docker Hub, and `https://host:5000/v2/` names
//! `host:5000`. `identitytoken` (OAuth refresh tokens) is not supported: such entries are ignored
//! with a debug log line, and the pull goes on anonymously.
//!
//! The caller passes the path of the file (`$DOCKER_CONFIG/config.json`, else
//! `~/.docker/config.json`; see [`docker_config_path`]) and the PATH to find helpers on, so nothing
//! here reads the process environment. The file is read with a 1 MiB cap. Helpers run in their
//! own process group with a 10 s timeout (then the whole group is killed) and capped output;
//! their output counts until they exit, not until every process they left behind closes it.
//! Secrets never appear in `Debug` output or errors: a failing helper is quoted by the first
//! line of its stderr only, escaped.
//! Where credentials may be sent is decided by `client`.

use banger_hint::Hint;
use base64::Engine;
use serde::Deserialize;
use std::borrow::Cow;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

const CONFIG_MAX_BYTES: u64 = 1 << 20;
const HELPER_TIMEOUT: Duration = Duration::from_secs(10);
const HELPER_STDOUT_MAX: usize = 64 << 10;
const HELPER_STDERR_MAX: usize = 16 << 10;
/// How long a helper's output is still read after it exited (what it wrote is in the pipe).
const HELPER_DRAIN: Duration = Duration::from_millis(500);
/// The key `docker login` uses for Docker Hub, and the server URL its helpers expect.
const HUB_KEY: &str = "https://index.docker.io/v1/";
const HUB_NAMES: [&str; 3] = ["docker.io", "index.docker.io", "registry-1.docker.io"];

/// A user name and a password (or token) for one registry. `Debug` hides the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    username: String,
    secret: String,
}

impl Credentials {
    pub fn new(username: impl Into<String>, secret: impl Into<String>) -> Self {
        Credentials {
            username: username.into(),
            secret: secret.into(),
        }
    }

    pub fn username(&self) -> &str {
        &self.username
    }

    pub(crate) fn secret(&self) -> &str {
        &self.secret
    }
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("username", &self.username)
            .field("secret", &"<redacted>")
            .finish()
    }
}

/// Why credentials could not be read. Messages never contain secrets.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read {}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is larger than {CONFIG_MAX_BYTES} bytes, too large for a Docker config", path.display())]
    TooLarge { path: PathBuf },
    #[error("{} is not a valid Docker config: {detail}", path.display())]
    Parse { path: PathBuf, detail: String },
    #[error(
        "the `auth` of `{key}` in {} is not base64 of USER:PASSWORD",
        path.display()
    )]
    BadAuth { path: PathBuf, key: String },
    #[error("credential helper name `{name}` in {} is not a plain name", path.display())]
    BadHelperName { path: PathBuf, name: String },
    #[error("credential helper {program} is not installed (not found on PATH)")]
    HelperMissing {
        program: String,
        registry: String,
        path: PathBuf,
    },
    #[error("credential helper {program} did not answer within {} s", HELPER_TIMEOUT.as_secs())]
    HelperTimeout { program: String },
    #[error("credential helper {program} failed ({status}): {stderr}")]
    HelperFailed {
        program: String,
        status: String,
        stderr: String,
    },
    #[error("credential helper {program} printed something that is not credentials: {detail}")]
    HelperOutput { program: String, detail: String },
    #[error("running credential helper {program} failed")]
    HelperSpawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
}

impl Hint for AuthError {
    fn hint(&self) -> Option<Cow<'_, str>> {
        match self {
            AuthError::Parse { .. } => {
                Some("fix the file, or log in again with `docker login`".into())
            }
            AuthError::BadAuth { .. } => Some("log in again with `docker login`".into()),
            AuthError::HelperMissing { registry, path, .. } => Some(
                format!(
                    "install it, or remove `credsStore`/`credHelpers` for {registry} from {}",
                    path.display()
                )
                .into(),
            ),
            _ => None,
        }
    }
}

/// Where Docker keeps its config: `$DOCKER_CONFIG/config.json`, else `HOME/.docker/config.json`.
/// Pass the values of those variables; `None` when neither is set.
pub fn docker_config_path(docker_config: Option<&OsStr>, home: Option<&Path>) -> Option<PathBuf> {
    match docker_config.filter(|d| !d.is_empty()) {
        Some(dir) => Some(Path::new(dir).join("config.json")),
        None => home.map(|h| h.join(".docker").join("config.json")),
    }
}

#[derive(Debug, Default, Deserialize)]
struct ConfigFile {
    #[serde(default)]
    auths: Option<HashMap<String, AuthEntry>>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: Option<HashMap<String, String>>,
}

#[derive(Default, Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

impl fmt::Debug for AuthEntry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuthEntry")
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// The host a config key names: `https://host:5000/v1/` -> `host:5000`, lowercased.
fn key_host(key: &str) -> String {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or("").to_ascii_lowercase()
}

fn is_hub(host: &str) -> bool {
    HUB_NAMES.contains(&host)
}

/// True when config key `key` is about `registry` (as in [`super::reference::Reference::registry`]).
fn key_matches(key: &str, registry: &str) -> bool {
    let (k, r) = (key_host(key), registry.to_ascii_lowercase());
    k == r || (is_hub(&k) && is_hub(&r))
}

/// Finds the entry for `registry` in a map keyed like `auths`: the exact key first, then Docker
/// Hub's canonical key, then any key naming the same host (in sorted order, to be deterministic).
fn find<'a, V>(map: &'a HashMap<String, V>, registry: &str) -> Option<(&'a str, &'a V)> {
    if let Some((k, v)) = map.get_key_value(registry) {
        return Some((k, v));
    }
    if is_hub(registry) {
        if let Some((k, v)) = map.get_key_value(HUB_KEY) {
            return Some((k, v));
        }
    }
    let mut keys: Vec<&String> = map.keys().filter(|k| key_matches(k, registry)).collect();
    keys.sort();
    keys.first()
        .and_then(|k| map.get_key_value(k.as_str()))
        .map(|(k, v)| (k.as_str(), v))
}

/// Credentials for `registry` (`docker.io`, `ghcr.io`, `127.0.0.1:5000`) from the Docker config at
/// `config_path`, running helpers found on `path_env` (the process's PATH when `None`).
/// A missing file, or no entry, is `Ok(None)`: pull anonymously.
pub async fn lookup(
    registry: &str,
    config_path: &Path,
    path_env: Option<&OsStr>,
) -> Result<Option<Credentials>, AuthError> {
    let Some(text) = read_config(config_path).await? else {
        return Ok(None);
    };
    let config: ConfigFile = serde_json::from_slice(&text).map_err(|e| AuthError::Parse {
        path: config_path.to_owned(),
        detail: super::reference::shorten(&e.to_string()),
    })?;
    let helper_target = if is_hub(&registry.to_ascii_lowercase()) {
        HUB_KEY
    } else {
        registry
    };
    if let Some((_, helper)) = config.cred_helpers.as_ref().and_then(|h| find(h, registry)) {
        return run_helper(helper, helper_target, registry, config_path, path_env).await;
    }
    if let Some((key, entry)) = config.auths.as_ref().and_then(|a| find(a, registry)) {
        if let Some(creds) = inline(config_path, key, entry)? {
            return Ok(Some(creds));
        }
    }
    if let Some(store) = config.creds_store.as_deref().filter(|s| !s.is_empty()) {
        return run_helper(store, helper_target, registry, config_path, path_env).await;
    }
    Ok(None)
}

async fn read_config(path: &Path) -> Result<Option<Vec<u8>>, AuthError> {
    match crate::capped::read_file_at_most(path, CONFIG_MAX_BYTES).await {
        Ok(Some(text)) => Ok(Some(text)),
        Ok(None) => Err(AuthError::TooLarge {
            path: path.to_owned(),
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(AuthError::Read {
            path: path.to_owned(),
            source,
        }),
    }
}

/// Credentials written in the file itself, if the entry has any.
fn inline(path: &Path, key: &str, entry: &AuthEntry) -> Result<Option<Credentials>, AuthError> {
    if let Some(auth) = entry.auth.as_deref().filter(|a| !a.is_empty()) {
        let bad = || AuthError::BadAuth {
            path: path.to_owned(),
            key: super::reference::shorten(key),
        };
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| bad())?;
        let text = String::from_utf8(raw).map_err(|_| bad())?;
        let (user, pass) = text.split_once(':').ok_or_else(bad)?;
        return Ok(Some(Credentials::new(user, pass)));
    }
    if let (Some(u), Some(p)) = (&entry.username, &entry.password) {
        if !u.is_empty() {
            return Ok(Some(Credentials::new(u.clone(), p.clone())));
        }
    }
    if entry
        .identitytoken
        .as_deref()
        .is_some_and(|t| !t.is_empty())
    {
        tracing::debug!(
            key = %super::reference::shorten(key),
            "ignoring identitytoken in the Docker config: banger does not support identity tokens"
        );
    }
    Ok(None)
}

/// `docker-credential-NAME` on `path_env` (else `PATH`), as an absolute path.
fn find_helper(program: &str, path_env: Option<&OsStr>) -> Option<PathBuf> {
    banger_config::programs::find_program(program, path_env, &[])
}

#[derive(Deserialize)]
struct HelperAnswer {
    #[serde(rename = "Username")]
    username: String,
    #[serde(rename = "Secret")]
    secret: String,
}

/// Runs `docker-credential-NAME get` with `server` on stdin and parses its answer.
async fn run_helper(
    name: &str,
    server: &str,
    registry: &str,
    config_path: &Path,
    path_env: Option<&OsStr>,
) -> Result<Option<Credentials>, AuthError> {
    // A name from the file becomes part of a program name: no paths, no surprises.
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        || name.starts_with('.')
    {
        return Err(AuthError::BadHelperName {
            path: config_path.to_owned(),
            name: super::reference::shorten(name),
        });
    }
    let program = format!("docker-credential-{name}");
    let Some(exe) = find_helper(&program, path_env) else {
        return Err(AuthError::HelperMissing {
            program,
            registry: registry.to_owned(),
            path: config_path.to_owned(),
        });
    };
    let mut cmd = tokio::process::Command::new(&exe);
    cmd.arg("get")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        // Its own process group, so whatever it starts can be ended with it.
        .process_group(0)
        .kill_on_drop(true);
    if let Some(p) = path_env {
        cmd.env("PATH", p);
    }
    let spawn_err = |source| AuthError::HelperSpawn {
        program: program.clone(),
        source,
    };
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let group = HelperGroup(child.id());
    let (Some(mut stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return Err(spawn_err(std::io::Error::other("missing stdio pipe")));
    };
    let mut out = Captured::new(HELPER_STDOUT_MAX);
    let mut err = Captured::new(HELPER_STDERR_MAX);
    let talk = async {
        // A helper that exits without reading stdin is fine: its answer still counts.
        let _ = stdin.write_all(server.as_bytes()).await;
        drop(stdin);
        let reading = async { tokio::join!(out.fill(stdout), err.fill(stderr)) };
        tokio::pin!(reading);
        let wait = child.wait();
        tokio::pin!(wait);
        tokio::select! {
            read = &mut reading => (Some(read), wait.await),
            // Exited: what it wrote is in the pipes already. Take that, but do not wait for
            // the end of output that a process it left behind may hold open for good.
            status = &mut wait => (
                tokio::time::timeout(HELPER_DRAIN, &mut reading).await.ok(),
                status,
            ),
        }
    };
    let (read, status) = match tokio::time::timeout(HELPER_TIMEOUT, talk).await {
        Ok(r) => r,
        Err(_) => {
            group.kill();
            return Err(AuthError::HelperTimeout { program });
        }
    };
    let status = status.map_err(spawn_err)?;
    match read {
        Some((out_read, err_read)) => {
            out_read.map_err(spawn_err)?;
            err_read.map_err(spawn_err)?;
        }
        // Something of the helper's outlived it holding its output: it goes too.
        None => group.kill(),
    }
    let (out, out_over) = (out.buf, out.over);
    let err_text = String::from_utf8_lossy(&err.buf);
    let out_text = String::from_utf8_lossy(&out);
    if !status.success() {
        if out_text.contains("credentials not found") || err_text.contains("credentials not found")
        {
            return Ok(None);
        }
        return Err(AuthError::HelperFailed {
            program,
            status: status.to_string(),
            stderr: first_line(&err_text),
        });
    }
    if out_over {
        return Err(AuthError::HelperOutput {
            program,
            detail: format!("more than {HELPER_STDOUT_MAX} bytes"),
        });
    }
    // Never put the helper's stdout into an error: it may hold the secret.
    let answer: HelperAnswer =
        serde_json::from_slice(&out).map_err(|e| AuthError::HelperOutput {
            program: program.clone(),
            detail: format!("invalid JSON at line {} column {}", e.line(), e.column()),
        })?;
    if answer.username == "<token>" {
        tracing::debug!(%program, "ignoring an identity token from the credential helper: banger does not support identity tokens");
        return Ok(None);
    }
    if answer.username.is_empty() && answer.secret.is_empty() {
        return Ok(None);
    }
    Ok(Some(Credentials::new(answer.username, answer.secret)))
}

/// A helper's process group (its pid: it was spawned as the group's leader).
struct HelperGroup(Option<u32>);

impl HelperGroup {
    /// SIGKILLs the helper and every process it started that stayed in its group. Daemons that
    /// left the group (setsid, as gpg-agent does) are not touched.
    fn kill(&self) {
        let Some(pgid) = self.0.and_then(|p| libc::pid_t::try_from(p).ok()) else {
            return;
        };
        if pgid <= 1 {
            return;
        }
        // SAFETY: kill(2) takes plain integers and touches no memory of ours. The group id is
        // the helper's pid, which cannot be reused while the group still has members.
        unsafe {
            libc::kill(-pgid, libc::SIGKILL);
        }
    }
}

/// Output of a helper, read up to a cap.
struct Captured {
    buf: Vec<u8>,
    max: usize,
    /// More than `max` bytes came (the rest was not read).
    over: bool,
}

impl Captured {
    fn new(max: usize) -> Self {
        Captured {
            buf: Vec::new(),
            max,
            over: false,
        }
    }

    /// Reads `r` to its end or to the cap. What was read stays in `buf` even if this future is
    /// dropped half-way (each chunk is appended as soon as it arrives).
    async fn fill(&mut self, mut r: impl AsyncRead + Unpin) -> std::io::Result<()> {
        let mut chunk = [0u8; 4096];
        loop {
            let n = r.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            let room = self.max - self.buf.len();
            if n > room {
                self.buf.extend_from_slice(&chunk[..room]);
                self.over = true;
                return Ok(());
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// The first non-empty line of a helper's stderr, shortened and with control characters
/// escaped: enough to say what went wrong, without echoing the rest (which could hold the
/// secret) or letting the helper drive the user's terminal.
fn first_line(stderr: &str) -> String {
    let line = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or("");
    super::reference::shorten(line)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsString;
    use std::os::unix::fs::PermissionsExt;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    fn write_config(dir: &Path, json: &str) -> PathBuf {
        let p = dir.join("config.json");
        std::fs::write(&p, json).unwrap();
        p
    }

    /// A fake `docker-credential-NAME` that logs its stdin to `dir/NAME.in` and runs `body`.
    fn helper(dir: &Path, name: &str, body: &str) -> OsString {
        let bin = dir.join("bin");
        std::fs::create_dir_all(&bin).unwrap();
        let p = bin.join(format!("docker-credential-{name}"));
        let script = format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 9\ncat > '{}/{name}.in'\n{body}\n",
            dir.display()
        );
        std::fs::write(&p, script).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        // Only our bin plus the system dirs the scripts need (cat, sleep).
        OsString::from(format!("{}:/usr/bin:/bin", bin.display()))
    }

    /// A fake helper `name` (see [`helper`]) as the config's `credsStore`: the config's path and
    /// the PATH to run it with.
    fn store_helper(dir: &Path, name: &str, body: &str) -> (PathBuf, OsString) {
        let path = helper(dir, name, body);
        let cfg = write_config(dir, &format!(r#"{{"credsStore":"{name}"}}"#));
        (cfg, path)
    }

    /// The pid a fake helper `name` wrote to `$0.child` for the process it started.
    fn helper_child(dir: &Path, name: &str) -> u32 {
        let file = dir.join(format!("bin/docker-credential-{name}.child"));
        std::fs::read_to_string(file)
            .unwrap()
            .trim()
            .parse()
            .unwrap()
    }

    /// True when process `pid` has ended (a zombie that nobody reaped yet counts as ended).
    fn gone(pid: u32) -> bool {
        for _ in 0..50 {
            match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
                Err(_) => return true,
                Ok(stat) => {
                    // `PID (COMM) STATE ...`; COMM may hold spaces, STATE follows the last `)`.
                    let state = stat.rsplit(')').next().unwrap_or("").trim_start();
                    if state.starts_with('Z') || state.starts_with('X') {
                        return true;
                    }
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    }

    #[tokio::test]
    async fn a_helper_that_leaves_a_process_holding_its_output_answers_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, path) = store_helper(
            dir.path(),
            "leaky",
            r#"sleep 300 & echo $! > "$0.child"; echo '{"Username":"lu","Secret":"ls"}'"#,
        );
        let started = std::time::Instant::now();
        let got = lookup("r.example", &cfg, Some(&path)).await.unwrap();
        assert_eq!(got, Some(Credentials::new("lu", "ls")));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "waited {:?} for the helper's output to end",
            started.elapsed()
        );
        assert!(
            gone(helper_child(dir.path(), "leaky")),
            "the process holding the helper's output is still running"
        );
    }

    #[tokio::test]
    async fn a_failing_helper_shows_only_its_first_line_of_stderr_escaped() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, path) = store_helper(
            dir.path(),
            "noisy",
            r#"printf '\n\033[31mboom\033]0;title\007 \001\n  SECRET-LINE2\n' >&2; exit 3"#,
        );
        let err = lookup("r.example", &cfg, Some(&path)).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("failed (exit status: 3)") && msg.contains("boom"),
            "{msg}"
        );
        assert!(
            !msg.chars().any(|c| c.is_control() && c != '\n'),
            "control characters in {msg:?}"
        );
        assert!(!msg.contains("SECRET-LINE2"), "{msg}");
        assert!(!msg.contains('\n'), "{msg:?}");
    }

    #[test]
    fn config_path_prefers_docker_config() {
        assert_eq!(
            docker_config_path(Some(OsStr::new("/dc")), Some(Path::new("/home/u"))),
            Some(PathBuf::from("/dc/config.json"))
        );
        assert_eq!(
            docker_config_path(Some(OsStr::new("")), Some(Path::new("/home/u"))),
            Some(PathBuf::from("/home/u/.docker/config.json"))
        );
        assert_eq!(docker_config_path(None, None), None);
    }

    #[tokio::test]
    async fn inline_auths_match_by_host_and_hub_aliases() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            &format!(
                r#"{{"auths":{{
                    "https://index.docker.io/v1/":{{"auth":"{}"}},
                    "https://reg.example:5000/v2/":{{"auth":"{}"}},
                    "ghcr.io":{{"username":"gh","password":"pw"}},
                    "other.example":{{}}
                }},"HttpHeaders":{{"X":"y"}}}}"#,
                b64("hubuser:hub:pass"),
                b64("r:s")
            ),
        );
        let get = |r: &'static str| {
            let cfg = cfg.clone();
            async move { lookup(r, &cfg, Some(OsStr::new(""))).await.unwrap() }
        };
        assert_eq!(
            get("docker.io").await,
            Some(Credentials::new("hubuser", "hub:pass"))
        );
        assert_eq!(
            get("reg.example:5000").await,
            Some(Credentials::new("r", "s"))
        );
        assert_eq!(get("ghcr.io").await, Some(Credentials::new("gh", "pw")));
        assert_eq!(get("other.example").await, None);
        assert_eq!(
            get("reg.example").await,
            None,
            "the port is part of the host"
        );
        assert_eq!(get("quay.io").await, None);
        let missing = dir.path().join("nope.json");
        assert_eq!(lookup("docker.io", &missing, None).await.unwrap(), None);
    }

    #[tokio::test]
    async fn identity_tokens_are_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            r#"{"auths":{"reg.example":{"identitytoken":"refresh-me"}}}"#,
        );
        assert_eq!(lookup("reg.example", &cfg, None).await.unwrap(), None);
    }

    #[tokio::test]
    async fn malformed_and_oversized_configs_fail_without_leaking_secrets() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = write_config(
            dir.path(),
            r#"{"auths":{"reg.example":{"auth":"not base64 SECRETVALUE"}}}"#,
        );
        let err = lookup("reg.example", &cfg, None).await.unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("not base64 of USER:PASSWORD") && !msg.contains("SECRETVALUE"),
            "{msg}"
        );
        let cfg = write_config(
            dir.path(),
            &format!(r#"{{"auths":{{"r":{{"auth":"{}"}}}}}}"#, b64("nocolon")),
        );
        assert!(matches!(
            lookup("r", &cfg, None).await,
            Err(AuthError::BadAuth { .. })
        ));
        let cfg = write_config(dir.path(), "{not json");
        assert!(matches!(
            lookup("r", &cfg, None).await,
            Err(AuthError::Parse { .. })
        ));
        let cfg = write_config(dir.path(), &" ".repeat(CONFIG_MAX_BYTES as usize + 1));
        assert!(matches!(
            lookup("r", &cfg, None).await,
            Err(AuthError::TooLarge { .. })
        ));
        let creds = Credentials::new("u", "hunter2");
        assert!(!format!("{creds:?}").contains("hunter2"));
    }

    #[tokio::test]
    async fn cred_helpers_then_inline_then_creds_store() {
        let dir = tempfile::tempdir().unwrap();
        helper(
            dir.path(),
            "per",
            r#"echo '{"ServerURL":"x","Username":"hu","Secret":"hs"}'"#,
        );
        let path = helper(
            dir.path(),
            "test",
            r#"echo '{"Username":"su","Secret":"ss"}'"#,
        );
        let cfg = write_config(
            dir.path(),
            &format!(
                r#"{{"credsStore":"test","credHelpers":{{"helped.example":"per"}},
                    "auths":{{"inline.example":{{"auth":"{}"}}}}}}"#,
                b64("iu:ip")
            ),
        );
        let get = |r: &'static str| {
            let (cfg, path) = (cfg.clone(), path.clone());
            async move { lookup(r, &cfg, Some(&path)).await.unwrap() }
        };
        assert_eq!(
            get("helped.example").await,
            Some(Credentials::new("hu", "hs"))
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("per.in")).unwrap(),
            "helped.example"
        );
        assert_eq!(
            get("inline.example").await,
            Some(Credentials::new("iu", "ip"))
        );
        assert_eq!(
            get("store.example:5000").await,
            Some(Credentials::new("su", "ss"))
        );
        assert_eq!(
            std::fs::read_to_string(dir.path().join("test.in")).unwrap(),
            "store.example:5000"
        );
        assert_eq!(get("docker.io").await, Some(Credentials::new("su", "ss")));
        assert_eq!(
            std::fs::read_to_string(dir.path().join("test.in")).unwrap(),
            HUB_KEY
        );
    }

    #[tokio::test]
    async fn helper_not_found_timeout_garbage_and_missing_binary() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                "nf",
                "echo 'credentials not found in native keychain'; exit 1",
                Ok(None),
            ),
            (
                "tok",
                r#"echo '{"Username":"<token>","Secret":"refresh"}'"#,
                Ok(None),
            ),
            ("bad", "echo 'Secret: SECRETVALUE'", Err("not credentials")),
            (
                "fail",
                "echo boom >&2; exit 3",
                Err("failed (exit status: 3): boom"),
            ),
            (
                "slow",
                // What the helper started goes too, not only the helper.
                "sleep 300 & echo $! > \"$0.child\"; exec sleep 30",
                Err("did not answer within 10 s"),
            ),
        ];
        for (name, body, want) in cases {
            let path = helper(dir.path(), name, body);
            let cfg = write_config(dir.path(), &format!(r#"{{"credsStore":"{name}"}}"#));
            let started = std::time::Instant::now();
            let got = lookup("r.example", &cfg, Some(&path)).await;
            assert!(started.elapsed() < Duration::from_secs(15));
            match (got, want) {
                (Ok(c), Ok(w)) => assert_eq!(c, w, "{name}"),
                (Err(e), Err(w)) => {
                    let msg = e.to_string();
                    assert!(
                        msg.contains(w) && !msg.contains("SECRETVALUE"),
                        "{name}: {msg}"
                    );
                }
                (got, want) => panic!("{name}: got {got:?}, want {want:?}"),
            }
        }
        assert!(
            gone(helper_child(dir.path(), "slow")),
            "the timed-out helper's child is still running"
        );
        let cfg = write_config(dir.path(), r#"{"credsStore":"absent"}"#);
        let err = lookup("r.example", &cfg, Some(OsStr::new("/nonexistent")))
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("docker-credential-absent is not installed"),
            "{err}"
        );
        for name in ["../../bin/sh", "a/b", "", ".hidden"] {
            let cfg = write_config(dir.path(), &format!(r#"{{"credsStore":"{name}"}}"#));
            // An empty credsStore is the same as none.
            match lookup("r.example", &cfg, None).await {
                Err(AuthError::BadHelperName { .. }) => {}
                Ok(None) if name.is_empty() => {}
                other => panic!("{name}: {other:?}"),
            }
        }
    }
}
